"""Triton adapter for the cascade (BLS); the logic is rtinfer.cascade, the decisions rtinfer.routing.

Runs the edge classifier through BLS; escalates to the big classifier in this server (BLS)
or, when ``cloud_url`` is set, to another Triton over gRPC (``rtinfer.cloud_leg``). Never raises
out of ``execute()`` (rtinfer.guard): one request can only fail itself."""
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from rtinfer import guard, imaging, labels, metrics, routing, stage_config
from rtinfer.cascade import Cascade, CloudAnswer
from rtinfer.postprocess import Postprocessor, softmax
from rtinfer.preprocess import Preprocessor, read_request


class TritonPythonModel:
    def initialize(self, args):
        cfg = stage_config.StageConfig(args)
        p = cfg.param
        self.edge_name, self.big_name = p("edge_model", "classifier_onnx"), p("cloud_model", "classifier_big")
        self.big_size = int(p("cloud_size", "260"))
        audit = cfg.audit_writer()  # one chain per cascade instance: its refusals and its served records
        pre = Preprocessor(
            cfg.keyring(), audit, pipelines=set(p("pipelines", "cascade").split(",")), replay=cfg.replay_guard(),
            max_envelope_bytes=int(p("max_envelope_bytes")), max_pixels=int(p("max_pixels")),
            version=args["model_version"], crop=p("crop", "center"),
            jpeg_draft=p("jpeg_draft", "true").lower() == "true", ctx_key=cfg.internal_keys(),
            keep_plaintext=True, stage="cascade")
        post = Postprocessor(audit, labels.names(), models={}, version=args["model_version"], keyring=pre.keys,
                             internal_keys=pre.ctx_key, ctx_store=cfg.context_store(), stage="cascade")
        repo = cfg.model_dir.parent
        edge_id = stage_config.classifier_ids(f"e={self.edge_name}/{p('edge_model_file')}".rstrip("/"), repo)["e"]
        self.cloud = None
        if p("cloud_url"):
            from rtinfer.access import flag, read_secret
            from rtinfer.cloud_leg import CloudLeg
            from rtinfer.keyring import Keyring, resolve_path
            ring = Keyring.load(resolve_path(p("cloud_keyring")))
            self.cloud = CloudLeg(
                p("cloud_url"), key=ring.key(p("cloud_key_id")), key_id=p("cloud_key_id"),
                client_id=p("cloud_client_id", "edge"), pipeline=p("cloud_pipeline", "pipeline"),
                api_key=read_secret(file=p("cloud_api_key_file") or None), tls_ca=p("cloud_tls_ca") or None,
                insecure_loopback_only=flag("cloud_insecure_loopback_only", p("cloud_insecure_loopback_only")),
                deadline_s=float(p("cloud_deadline_s", "1.0")), attempts=int(p("cloud_attempts", "2")),
                breaker=routing.Breaker(failures=int(p("cloud_breaker_failures", "3")),
                                        reset_s=float(p("cloud_breaker_reset_s", "5"))))
            cloud_id = self.cloud.model_id
        else:
            cloud_id = stage_config.classifier_ids(f"c={self.big_name}", repo)["c"]
        self.cascade = Cascade(pre, post, routing.Policy(p("confidence_metric", "top1"), float(p("threshold", "0.5"))),
                               edge_model=edge_id, cloud_model=cloud_id)
        self.cloud_id = cloud_id
        self.metrics = metrics.for_stage_or_none(pb_utils, "cascade", cfg)
        if self.metrics is not None:  # the classifier files this replica serves (rtinfer_model_info)
            served = f"e={self.edge_name}/{p('edge_model_file')}".rstrip("/")
            served += "" if self.cloud else f",c={self.big_name}"
            guard.attempt(lambda: self.metrics.models(cfg.installed_classifiers(served)))

    def execute(self, requests):
        # metrics after the answers are sent: no request waits for their round trips to the server
        return guard.respond(pb_utils, requests, self._handle, after=lambda: self._export(len(requests)))

    def _handle(self, requests):
        reqs = [read_request(pb_utils, request) for request in requests]
        results = self.cascade.run(reqs, [r.params for r in reqs], self._edge, self.cloud or self._big)
        out = []
        for result in results:
            if not isinstance(result, guard.Refusal):
                probs, ref = result
                result = [pb_utils.Tensor("PROBS", np.asarray(probs, np.float32)[np.newaxis]),
                          pb_utils.Tensor("AUDIT_REF", np.array([[ref]], dtype=np.object_))]
            out.append(result)
        return out

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
        response = pb_utils.InferenceRequest(model_name=model, inputs=[pb_utils.Tensor("input", images)],
                                             requested_output_names=["logits"]).exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, "logits").as_numpy()

    def _edge(self, images: np.ndarray) -> np.ndarray:
        return self._infer(self.edge_name, images)

    def _big(self, rows) -> list:
        """The cloud in this server: the big classifier on the same image bytes, decoded and cropped at its size
        (the model card's transform for it: shorter side to size + 32, centre crop)."""
        t0 = time.perf_counter()
        pre = self.cascade.pre
        x = np.stack([imaging.preprocess(r.plaintext, max_pixels=pre.max_pixels, draft=pre.jpeg_draft,
                                         size=self.big_size) for r in rows])
        probs = softmax(self._infer(self.big_name, x))
        ms = (time.perf_counter() - t0) * 1e3
        return [CloudAnswer(p, self.cloud_id, ms) for p in probs]

    def finalize(self):
        self.cascade.pre.audit.close()
        self.cascade.pre.replay.close()
        self.cascade.post.ctx_store.close()
        if self.cloud is not None:
            self.cloud.close()
