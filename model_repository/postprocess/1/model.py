"""Triton adapter for the postprocess stage; the logic is rtinfer.postprocess.

Never raises out of ``execute()`` (rtinfer.guard): a request whose tensors cannot be
read, or whose row the stage refuses, fails alone."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from rtinfer import guard, labels, metrics, stage_config
from rtinfer.postprocess import Postprocessor


class TritonPythonModel:
    def initialize(self, args):
        cfg = stage_config.StageConfig(args)
        self.post = Postprocessor(cfg.audit_writer(), labels.names(), models=cfg.classifier_models(),
                                  version=args["model_version"], keyring=cfg.keyring(),
                                  internal_keys=cfg.internal_keys(), ctx_store=cfg.context_store())
        self.metrics = metrics.for_stage_or_none(pb_utils, "postprocess", cfg)
        if self.metrics is not None:  # the classifier files this replica serves (rtinfer_model_info)
            guard.attempt(lambda: self.metrics.models(cfg.installed_classifiers()))

    def execute(self, requests):
        # metrics after the answers are sent: no request waits for their round trips to the server
        return guard.respond(pb_utils, requests, self._handle, after=lambda: self._export(len(requests)))

    def _handle(self, requests):
        rows = [_read(request) for request in requests]
        logits, contexts, ids, params = [], [], [], []
        for lg, ctx, rid, prm in rows:
            logits.append(lg)
            contexts.extend(ctx)
            ids.extend([rid] * len(ctx))
            params.extend([prm] * len(ctx))
        probs, refs = self.post.run(np.concatenate(logits) if logits else np.zeros((0, 1000), np.float32),
                                    contexts, ids, params)
        out, start = [], 0
        for row in rows:
            n = len(row[1])
            mine = refs[start:start + n]
            errors = [r for r in mine if isinstance(r, guard.Refusal)]
            out.append(errors[0] if errors else [
                pb_utils.Tensor("PROBS", probs[start:start + n]),
                pb_utils.Tensor("AUDIT_REF", np.array(mine, dtype=np.object_).reshape(n, 1))])
            start += n
        return out

    def _export(self, batch: int):
        """Stage metrics (rtinfer.metrics) on Triton's metrics port; a failure here fails no request."""
        if self.metrics is not None:
            self.metrics.report(self.post.last, batch)
            self.metrics.audit(self.post.audit)
            self.metrics.store(self.post.ctx_store, "contexts")

    def finalize(self):
        self.post.audit.close()
        self.post.ctx_store.close()


def _read(request):
    """(logits [n,1000], n contexts, request id, parameters) of one request; one that cannot be read
    becomes one row whose context is its Refusal (the stage audits it and answers it alone)."""
    def read():
        params = json.loads(request.parameters() or "{}")
        lg = np.asarray(pb_utils.get_input_tensor_by_name(request, "LOGITS").as_numpy(), np.float32).reshape(-1, 1000)
        ctx = pb_utils.get_input_tensor_by_name(request, "AUDIT_CTX").as_numpy().reshape(-1)
        if lg.shape[0] != len(ctx):
            raise ValueError("LOGITS and AUDIT_CTX have different batch sizes")
        return lg, [bytes(c) for c in ctx], str(request.request_id()), params if isinstance(params, dict) else {}
    row = guard.attempt(read, blame=guard.CLIENT)
    if isinstance(row, guard.Refusal):
        rid = guard.attempt(lambda: str(request.request_id()))
        row = np.zeros((1, 1000), np.float32), [row], rid if isinstance(rid, str) else "", {}
    return row
