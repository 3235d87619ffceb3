"""A Python-based Triton backend named `onnxruntime`.

The embedded `tritonserver` from the nvidia-pytriton wheel has no native ONNX
Runtime backend; this file, installed as ``<backend-dir>/onnxruntime/model.py``,
serves the same ``backend: "onnxruntime"`` models, so one model repository runs
here and, with the native backend, in the NGC container. It honours the model's
max_batch_size (Triton's batcher groups requests; this runs them as one batch),
instance_group (one stub process per instance) and the native backend's
``intra_op_thread_count`` / ``inter_op_thread_count`` parameters.

It never raises out of ``execute()``: when the batch as a whole fails, each request
is run alone, so a request can only fail itself (answered UNAVAILABLE, with no
exception name or path).
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_thread_count") or 0)
        opts.inter_op_num_threads = int(params.get("inter_op_thread_count") or 0)
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        path = os.path.join(args["model_repository"], args["model_version"],
                            config.get("default_model_filename") or "model.onnx")
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.inputs = [(t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]

    def execute(self, requests):
        try:
            return self._run(requests)
        except Exception:  # noqa: BLE001 - one request's data must not fail the others: run them one by one
            if len(requests) == 1:
                return [_unavailable()]
            return [self._one(r) for r in requests]

    def _one(self, request):
        try:
            return self._run([request])[0]
        except Exception:  # noqa: BLE001
            return _unavailable()

    def _run(self, requests):
        feeds, sizes = {}, []
        for name, dtype in self.inputs:
            parts = [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
            feeds[name] = np.ascontiguousarray(np.concatenate(parts), dtype=dtype)
            sizes = [p.shape[0] for p in parts]
        results = self.session.run(self.outputs, feeds)
        responses, start = [], 0
        for n in sizes:
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, value[start:start + n]) for name, value in zip(self.outputs, results)]))
            start += n
        return responses


def _unavailable():
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(
        "the classifier could not process this request; retry later", pb_utils.TritonError.UNAVAILABLE))
