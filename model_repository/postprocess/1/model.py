"""Triton adapter for the postprocess stage; the logic is rtinfer.postprocess."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from rtinfer import labels, stage_config
from rtinfer.postprocess import Postprocessor


class TritonPythonModel:
    def initialize(self, args):
        cfg = stage_config.StageConfig(args)
        self.post = Postprocessor(cfg.audit_writer(), labels.names(), models=cfg.classifier_models(),
                                  version=args["model_version"], keyring=cfg.keyring())

    def execute(self, requests):
        logits, contexts, ids, sizes, params = [], [], [], [], []
        for request in requests:
            req_params = json.loads(request.parameters() or "{}")
            lg = pb_utils.get_input_tensor_by_name(request, "LOGITS").as_numpy()
            ctx = pb_utils.get_input_tensor_by_name(request, "AUDIT_CTX").as_numpy().reshape(-1)
            logits.append(lg)
            contexts.extend(bytes(c) for c in ctx)
            sizes.append(lg.shape[0])
            ids.extend([request.request_id()] * lg.shape[0])
            params.extend([req_params] * lg.shape[0])
        probs, refs = self.post.run(np.concatenate(logits), contexts, ids, params)
        responses, start = [], 0
        for n in sizes:
            rows = refs[start:start + n]
            errors = [r for r in rows if isinstance(r, Exception)]
            if errors:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(errors[0]), pb_utils.TritonError.INVALID_ARG)))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("PROBS", probs[start:start + n]),
                    pb_utils.Tensor("AUDIT_REF", np.array(rows, dtype=np.object_).reshape(n, 1)),
                ]))
            start += n
        return responses

    def finalize(self):
        self.post.audit.close()
