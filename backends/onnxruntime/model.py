"""A Python-based Triton backend named `onnxruntime`.

The embedded `tritonserver` from the nvidia-pytriton wheel has no native ONNX
Runtime backend; this file, installed as ``<backend-dir>/onnxruntime/model.py``,
serves the same ``backend: "onnxruntime"`` models, so one model repository runs
here and, with the native backend, in the NGC container. It honours the model's
max_batch_size (Triton's batcher groups requests; this runs them as one batch),
instance_group (one stub process per instance) and the native backend's
``intra_op_thread_count`` / ``inter_op_thread_count`` parameters; parameters named
``session.*`` are ONNX Runtime session config entries (``session.intra_op.allow_spinning``).

``lone_request_thread_count`` (ours, 0 = off): one thread per instance keeps the cores
for the other instances and the Python stages under load, but leaves cores idle
for a lone request. With it, a batch of one request runs on a second session with
that many threads when no other model instance of this server is computing
(``rtinfer.busy``: instances that mark themselves busy, probed, never waited for).
``lone_request_allow_spinning`` sets that session's spinning, ``lone_request_force_spinning_stop``
ORT's ``session.force_spinning_stop``: threads that spin-wait between the steps of a run but
stop at its end, so an idle server burns no core.

It never raises out of ``execute()``: when the batch as a whole fails, each request
is run alone, so a request can only fail itself (answered UNAVAILABLE, with no
exception name or path).
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _session(path, params, intra, spinning=None, spinning_stop=None):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra
    opts.inter_op_num_threads = int(params.get("inter_op_thread_count") or 0)
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    for key, value in params.items():
        if key.startswith("session."):
            opts.add_session_config_entry(key, value)
    if spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    if spinning_stop is not None:
        opts.add_session_config_entry("session.force_spinning_stop", spinning_stop)
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"],
                            config.get("default_model_filename") or "model.onnx")
        self.session = _session(path, params, int(params.get("intra_op_thread_count") or 0))
        lone = int(params.get("lone_request_thread_count") or 0)
        self.lone = None
        if lone:
            self.lone = _session(path, params, lone, params.get("lone_request_allow_spinning"),
                                 params.get("lone_request_force_spinning_stop"))
            from rtinfer import busy  # on PYTHONPATH in the embedded server, the only place this backend runs
            self.peers = busy.Marker(args["model_instance_name"])
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
            # one request: its tensor as it is (no copy), unless ORT needs another type or layout
            joined = parts[0] if len(parts) == 1 else np.concatenate(parts)
            feeds[name] = np.ascontiguousarray(joined, dtype=dtype)
            sizes = [p.shape[0] for p in parts]
        if self.lone is None:
            results = self.session.run(self.outputs, feeds)
        else:
            with self.peers:
                wide = sum(sizes) == 1 and not self.peers.others_busy()
                results = (self.lone if wide else self.session).run(self.outputs, feeds)
        responses, start = [], 0
        for n in sizes:
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, value[start:start + n]) for name, value in zip(self.outputs, results)]))
            start += n
        return responses

    def finalize(self):
        if self.lone is not None:
            self.peers.close()


def _unavailable():
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(
        "the classifier could not process this request; retry later", pb_utils.TritonError.UNAVAILABLE))
