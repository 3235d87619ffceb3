"""Triton adapter for the postprocess stage: Triton tensors to and from rtinfer.postprocess, built by
rtinfer.stage_config.

Never raises out of ``execute()`` (rtinfer.guard): a request whose tensors cannot be
read, or whose row the stage refuses, fails alone."""
import numpy as np
import triton_python_backend_utils as pb_utils

from rtinfer import guard, metrics, stage_config
from rtinfer.errors import Refusal
from rtinfer.postprocess import read_request


class TritonPythonModel:
    def initialize(self, args):
        cfg = stage_config.StageConfig(args)
        self.post = cfg.postprocessor()
        self.metrics = metrics.for_stage_or_none(pb_utils, "postprocess", cfg)
        if self.metrics is not None:  # the classifier files this replica serves (rtinfer_model_info)
            guard.attempt(lambda: self.metrics.models(cfg.installed_classifiers()))

    def execute(self, requests):
        # metrics after the answers are sent: no request waits for their round trips to the server
        return guard.respond(pb_utils, requests, self._handle, after=lambda: self._export(len(requests)))

    def _handle(self, requests):
        results = self.post.run_requests([read_request(pb_utils, r, self.post.classes) for r in requests])
        return [r if isinstance(r, Refusal) else
                [pb_utils.Tensor("PROBS", r[0]),
                 pb_utils.Tensor("AUDIT_REF", np.array(r[1], dtype=np.object_).reshape(-1, 1))]
                for r in results]

    def _export(self, batch: int):
        """Stage metrics (rtinfer.metrics) on Triton's metrics port; a failure here fails no request."""
        if self.metrics is not None:
            self.metrics.report(self.post.last, batch)
            self.metrics.audit(self.post.audit)
            self.metrics.store(self.post.ctx_store, "contexts")

    def finalize(self):
        self.post.audit.close()
        self.post.ctx_store.close()
