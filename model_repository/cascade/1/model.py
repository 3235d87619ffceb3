"""Triton adapter for the cascade (BLS): Triton tensors to and from rtinfer.cascade (the decisions:
rtinfer.routing), built by rtinfer.stage_config.

Runs the edge classifier through BLS; escalates to the big classifier in this server (BLS,
``rtinfer.cascade.LocalCloud``) or, when ``cloud_url`` is set, to another Triton over gRPC
(``rtinfer.cloud_leg``). Never raises out of ``execute()`` (rtinfer.guard): one request can only fail itself."""
import numpy as np
import triton_python_backend_utils as pb_utils

from rtinfer import guard, metrics, stage_config
from rtinfer.cascade import LocalCloud
from rtinfer.errors import Refusal
from rtinfer.preprocess import read_request


class TritonPythonModel:
    def initialize(self, args):
        cfg = stage_config.StageConfig(args)
        pre = cfg.preprocessor(stage="cascade", keep_plaintext=True)
        post = cfg.postprocessor(stage="cascade", sharing=pre)  # one audit chain per cascade instance
        self.models = cfg.cascade_models()
        self.cloud = cfg.cloud_leg()  # None: the big classifier in this server answers escalations
        self.cascade = cfg.cascade(pre, post, self.cloud)
        self.ask_cloud = self.cloud or LocalCloud(lambda x: self._infer(self.models.big, x), pre,
                                                  size=self.models.big_size, model_id=self.cascade.cloud_model)
        self.metrics = metrics.for_stage_or_none(pb_utils, "cascade", cfg)
        if self.metrics is not None:  # the classifier files this replica serves (rtinfer_model_info)
            served = self.models.served(remote=self.cloud is not None)
            guard.attempt(lambda: self.metrics.models(cfg.installed_classifiers(served)))

    def execute(self, requests):
        # metrics after the answers are sent: no request waits for their round trips to the server
        return guard.respond(pb_utils, requests, self._handle, after=lambda: self._export(len(requests)))

    def _handle(self, requests):
        reqs = [read_request(pb_utils, request) for request in requests]
        results = self.cascade.run(reqs, [r.params for r in reqs], self._edge, self.ask_cloud)
        return [r if isinstance(r, Refusal) else
                [pb_utils.Tensor("PROBS", np.asarray(r[0], np.float32)[np.newaxis]),
                 pb_utils.Tensor("AUDIT_REF", np.array([[r[1]]], dtype=np.object_))]
                for r in results]

    def _export(self, batch: int):
        """Stage metrics (rtinfer.metrics: outcomes and refusals as preprocess counts them, routes, the
        served requests' durations) on Triton's metrics port; a failure here fails no request."""
        if self.metrics is not None:
            c = self.cascade
            self.metrics.report(c.pre.last, batch)
            for v in c.post.last.timings.get("request_duration_seconds", []):
                self.metrics.observe("request_duration_seconds", v)
            self.metrics.routes(c.last_routes)
            self.metrics.audit(c.pre.audit)
            self.metrics.keyring(c.pre.keys)
            self.metrics.store(c.pre.replay, "nonces")

    def _infer(self, model: str, images: np.ndarray) -> np.ndarray:
        """One BLS call: ``images`` as ``input``, its ``logits``."""
        response = pb_utils.InferenceRequest(model_name=model, inputs=[pb_utils.Tensor("input", images)],
                                             requested_output_names=["logits"]).exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, "logits").as_numpy()

    def _edge(self, images: np.ndarray) -> np.ndarray:
        return self._infer(self.models.edge, images)

    def finalize(self):
        self.cascade.pre.audit.close()
        self.cascade.pre.replay.close()
        self.cascade.post.ctx_store.close()
        if self.cloud is not None:
            self.cloud.close()
