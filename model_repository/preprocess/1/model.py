"""Triton adapter for the preprocess stage; the logic is rtinfer.preprocess."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from rtinfer import stage_config
from rtinfer.preprocess import Accepted, Preprocessor, Request


class TritonPythonModel:
    def initialize(self, args):
        cfg = stage_config.StageConfig(args)
        self.pre = Preprocessor(
            cfg.keyring(), cfg.audit_writer(),
            pipelines=set(cfg.param("pipelines").split(",")),
            replay=cfg.replay_guard(),
            max_envelope_bytes=int(cfg.param("max_envelope_bytes")),
            max_pixels=int(cfg.param("max_pixels")),
            version=args["model_version"],
            crop=cfg.param("crop", "center"),
            crop_by_pipeline=dict(kv.split("=", 1) for kv in cfg.param("crop_by_pipeline").split(",") if kv),
            jpeg_draft=cfg.param("jpeg_draft", "true").lower() == "true",
        )

    def execute(self, requests):
        batch = []
        for request in requests:
            params = json.loads(request.parameters() or "{}")
            raw = pb_utils.get_input_tensor_by_name(request, "ENVELOPE").as_numpy().reshape(-1)
            batch.append(Request(envelope=bytes(raw[0]) if len(raw) else b"", request_id=request.request_id(),
                                 client_id=str(params.get("client_id", "")), count=len(raw)))
        responses = []
        for result in self.pre.run(batch):
            if isinstance(result, Accepted):
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("IMAGE", result.image[np.newaxis]),
                    pb_utils.Tensor("AUDIT_CTX", np.array([[result.context]], dtype=np.object_)),
                ]))
            else:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(result.message, pb_utils.TritonError.INVALID_ARG)))
        return responses

    def finalize(self):
        self.pre.audit.close()
        self.pre.replay.close()
