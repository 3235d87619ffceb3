"""Monitoring promises (docs/monitoring.md, rtinfer/metrics.py) that no other test exercised (issue 23, section 4):

- a metrics failure never fails a request: on a real server whose postprocess cannot build its stage metrics
  (a bad ``metrics_max_clients``), the model loads and requests are served, without those metrics; and in
  the stage adapters themselves (model_repository/*/1/model.py, loaded in-process), a metric export that
  raises on every update leaves every request served and audited;
- ``rtinfer_keyring_reloads_total{result="error"}`` counts a bad reload: a real server with its own keyring
  (never the session's, which other servers read) is given a keyring that is not JSON and one readable by
  others; each reload that fails is counted on the real metrics endpoint, the previous keys keep serving,
  and a good file afterwards is counted as ``ok``.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import sys
import types
import urllib.request

import numpy as np
import pytest

from clients import samples
from clients.classify import PipelineClient
from rtinfer import audit, keyring
from rtinfer.launch.server import TritonServer, repository_with

from conftest import require_model, settled
from helpers import ESPRESSO, REPO, metric_value, parse_metrics, records_for, wait_until


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """The pipeline with its own keyring, postprocess unable to build its metrics; preprocess checks the
    keyring file on every request (keyring_check_s 0), so a reload needs no waiting."""
    require_model()
    d = tmp_path_factory.mktemp("metrics-promises")
    ring = keyring.write_new(d / "keys" / "keyring.json", key_ids=("k1",))
    repo = repository_with(d / "repo", {"postprocess": {"metrics_max_clients": "twenty"},
                                        "preprocess": {"keyring_check_s": "0"}})
    with TritonServer(repo, keyring=str(ring), audit_dir=str(d / "audit"), workdir=d / "triton") as srv:
        srv.ring, srv.audit_dir = ring, d / "audit"
        yield srv


def scrape(server) -> dict:
    return parse_metrics(urllib.request.urlopen(server.metrics_url, timeout=10).read().decode())


def classify(server):
    return classify_with(server, server.ring.read_bytes())


def classify_with(server, keyring_bytes: bytes):
    """A request sealed with k1 of ``keyring_bytes`` (after a bad file replaced the keyring: the keys the
    server had before)."""
    key = base64.b64decode(json.loads(keyring_bytes)["keys"]["k1"]["key"])
    c = PipelineClient(server.grpc_url, key=key, key_id="k1", client_id="metrics-promises")
    try:
        return c.classify(samples.photo("coffee"), top_k=1)
    finally:
        c.close()


# ------------------------------------------------------------------ a metrics failure fails no request

def test_a_stage_whose_metrics_fail_to_build_still_loads_and_serves(stages):
    res = classify(stages)
    assert res.predictions[0].index == ESPRESSO
    [rec] = [r for r in records_for(stages.audit_dir, res.request_id) if r["stage"] == "postprocess"]
    assert rec["event"] == "served"
    m = settled(lambda: scrape(stages))
    # the metrics really failed: postprocess has none, preprocess (same server) has its own
    assert metric_value(m, "rtinfer_requests_total", stage="preprocess", outcome="accepted") >= 1
    assert not [k for k in m if k[0].startswith("rtinfer_") and ("stage", "postprocess") in k[1]], \
        sorted(k for k in m if k[0].startswith("rtinfer_"))
    log = stages.log_file.read_text(errors="replace")
    assert "postprocess: no stage metrics" in log and "twenty" in log, log[-3000:]


# ------------------------------------------------------------------ a bad keyring reload is counted

def reloads(server, result: str) -> float:
    return metric_value(scrape(server), "rtinfer_keyring_reloads_total", stage="preprocess", result=result)


def replace_file(path, data: bytes, mode: int = 0o600) -> None:
    """As an operator's tool would: a new file renamed over the old one (the reload sees a new inode)."""
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def test_bad_keyring_reloads_are_counted_and_the_previous_keys_keep_serving(stages):
    ring_path = stages.ring
    good = ring_path.read_bytes()
    before = classify(stages)  # the exporter has read the counters once: series exist
    assert before.predictions[0].index == ESPRESSO
    errors0, ok0 = settled(lambda: (reloads(stages, "error"), reloads(stages, "ok")))
    try:
        # 1. not JSON
        replace_file(ring_path, b'{"keys": {"k1": ')
        res = classify_with(stages, good)
        assert res.predictions[0].index == ESPRESSO  # the previous keys serve on
        assert wait_until(lambda: reloads(stages, "error") == errors0 + 1, timeout=10), reloads(stages, "error")
        # 2. valid, but readable by others: refused as well (a key file must be 0600)
        replace_file(ring_path, good, mode=0o644)
        assert classify_with(stages, good).predictions[0].index == ESPRESSO
        assert wait_until(lambda: reloads(stages, "error") == errors0 + 2, timeout=10), reloads(stages, "error")
        assert reloads(stages, "ok") == ok0  # neither counted as a good reload
    finally:
        replace_file(ring_path, good)  # 3. the good file again: a good reload
    assert classify_with(stages, good).predictions[0].index == ESPRESSO
    assert wait_until(lambda: reloads(stages, "ok") == ok0 + 1, timeout=10), reloads(stages, "ok")
    assert reloads(stages, "error") == errors0 + 2
    log = stages.log_file.read_text(errors="replace")
    assert "keyring not reloaded, keeping the previous keys" in log


def test_audit_trail_of_this_server_verifies(stages):
    """Whatever the metrics did, the audit trail is whole."""
    reports = audit.verify_path(stages.audit_dir)
    assert reports and all(r.ok for reps in reports.values() for r in reps), reports


# ------------------------------------------------------------------ the adapters: an export that raises
# The server above shows a metrics failure at load. A failure while exporting (the server process gone
# away under the stub, a metric update refused) cannot be provoked in a real server from outside, so the
# real adapters (model_repository/{preprocess,postprocess}/1/model.py, with the real stages, keyring, audit
# writer and replay stores on a temp dir) are loaded in-process with a stand-in for Triton's Python API
# (triton_python_backend_utils): its metric updates raise once the models are loaded.

class _Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class _Request:
    def __init__(self, request_id, tensors, parameters=None):
        self._id, self._params, self.sent = request_id, json.dumps(parameters or {}), []
        self.tensors = {name: _Tensor(name, array) for name, array in tensors.items()}

    def request_id(self):
        return self._id

    def parameters(self):
        return self._params

    def get_response_sender(self):
        request = self

        class Sender:
            def send(self, response, flags=0):
                request.sent.append((response, flags))
        return Sender()


class _Metrics:
    """MetricFamily stand-in: works while the models load (series at zero), then every update raises."""
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    broken = False
    failures = 0

    def __init__(self, name, description, kind):
        self.check()

    @classmethod
    def check(cls):
        if cls.broken:
            cls.failures += 1
            raise RuntimeError("metric update failed: the server process is gone")

    def Metric(self, labels, buckets=None):  # pb_utils' name
        self.check()
        family = self

        class Metric:
            def increment(self, value):
                family.check()

            def set(self, value):
                family.check()

            def observe(self, value):
                family.check()
        return Metric()


def pb_utils_stand_in():
    mod = types.ModuleType("triton_python_backend_utils")

    class TritonError:
        UNAVAILABLE, INVALID_ARG = "UNAVAILABLE", "INVALID_ARG"

        def __init__(self, message, code=None):
            self._message, self.code = message, code

        def message(self):
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.output_tensors, self._error = output_tensors or [], error

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

    class Logger:
        lines: list = []

        @classmethod
        def log_warn(cls, msg):
            cls.lines.append(msg)

        log_error = log_info = log_warn

    mod.Tensor, mod.TritonError, mod.InferenceResponse, mod.Logger = _Tensor, TritonError, InferenceResponse, Logger
    mod.MetricFamily = type("MetricFamily", (_Metrics,), {"broken": False, "failures": 0})
    mod.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    mod.get_input_tensor_by_name = lambda request, name: request.tensors.get(name)
    return mod


def load_adapter(name: str, pb_utils, audit_dir, monkeypatch):
    """The stage's real model.py, initialized as Triton would (its config's parameters, this repository)."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
    model_dir = REPO / name
    cfg = model_dir / "configs" / "cpu.pbtxt"
    text = (cfg if cfg.exists() else model_dir / "config.pbtxt").read_text()
    params = {k: {"string_value": v} for k, v in
              re.findall(r'\{ key: "([^"]+)" value: \{ string_value: "([^"]*)" \} \}', text)}
    spec = importlib.util.spec_from_file_location(f"adapter_{name}", model_dir / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps({"name": name, "parameters": params}),
                      "model_instance_name": f"{name}_0_0", "model_repository": str(model_dir),
                      "model_version": "1", "model_name": name})
    return model


def test_metric_exports_that_raise_fail_no_request_in_the_adapters(tmp_path, monkeypatch):
    ring_path = keyring.write_new(tmp_path / "keys" / "keyring.json", key_ids=("k1",))
    audit_dir = tmp_path / "audit"
    monkeypatch.setenv(keyring.ENV_VAR, str(ring_path))
    monkeypatch.setenv(audit.ENV_DIR, str(audit_dir))
    pb = pb_utils_stand_in()
    pre = load_adapter("preprocess", pb, audit_dir, monkeypatch)
    post = load_adapter("postprocess", pb, audit_dir, monkeypatch)
    assert pre.metrics is not None and post.metrics is not None  # both export (until it breaks)
    pb.MetricFamily.broken = True
    try:
        ring = keyring.Keyring.load(ring_path)
        client = PipelineClient("unused:1", key=ring.key("k1"), key_id="k1", client_id="metrics-adapter")
        ids = [f"m{i}" for i in range(3)]
        requests = [_Request(rid, {"ENVELOPE": np.array([[client.seal(samples.photo("coffee"))]], dtype=np.object_)},
                             {"client_id": "metrics-adapter"}) for rid in ids]
        responses = pre.execute(requests)  # preprocess answers by returning its responses
        assert [r.has_error() for r in responses] == [False] * 3, [r.error() and r.error().message() for r in responses]
        failures_pre = pb.MetricFamily.failures
        assert failures_pre > 0  # its export ran and raised
        # postprocess gets what the classifier would give: logits for class 967, and preprocess's AUDIT_CTX
        logits = np.full((1, 1000), -10.0, np.float32)
        logits[0, ESPRESSO] = 10.0
        post_requests = []
        for rid, resp in zip(ids, responses):
            ctx = {t.name(): t for t in resp.output_tensors}["AUDIT_CTX"].as_numpy()
            post_requests.append(_Request(rid, {"LOGITS": logits, "AUDIT_CTX": ctx}))
        assert post.execute(post_requests) is None  # answers through the response senders
        assert pb.MetricFamily.failures > failures_pre  # its export (after the answers) ran and raised
        for r in post_requests:
            [(response, flags)] = r.sent
            assert flags == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL and not response.has_error(), \
                response.error() and response.error().message()
            assert int(np.argmax({t.name(): t for t in response.output_tensors}["PROBS"].as_numpy())) == ESPRESSO
    finally:
        pre.finalize()
        post.finalize()
    served = {r["request_id"] for r in audit.read_records(audit_dir) if r.get("event") == "served"}
    assert served == set(ids)
    assert all(r.ok for reps in audit.verify_path(audit_dir).values() for r in reps)
