"""NVIDIA's perf_analyzer through the real gateway, and what the gateway reveals for it.

perf_analyzer reads an ensemble's steps' config before it sends a request; the gateway answers those reads
over HTTP from the snapshot its launcher took at start (rtinfer/launch/model_docs.py), stripped. Here the
stages' parameters hold real paths (key files, the audit directory), as a deployment's may: Triton's own
config shows them, the gateway's never does. A step's config needs the inference key and a step stays
uninferable. One short perf_analyzer run (tritonclient 2.50.0's binary, deploy/perf_analyzer/) goes through
the gateway and every request is audited once; one envelope fewer than its requests makes it replay one.
"""
from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request

import grpc
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from clients import samples
from loadtest import perf_analyzer as pa
from rtinfer import access, audit, envelope
from rtinfer.keyring import Keyring
from rtinfer.launch import model_docs
from rtinfer.launch.gateway import Gateway
from rtinfer.launch.server import TritonServer

from conftest import GATED_API_KEY, model_repository_with, require_haproxy, require_model

STEPS = ("preprocess", "classifier_onnx", "postprocess")  # the CPU pipeline's


@pytest.fixture(scope="module")
def tool():
    try:
        return pa.tool()  # unpacks the pinned wheels into build/perf_analyzer/tool when missing
    except SystemExit as exc:  # make test runs it with the network it needs: a failure, not a skip
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def stack(keyring_path, signing_key, tmp_path_factory):
    """Triton whose stages' parameters name real files (keyring, audit directory, signing key), behind the
    gateway with the inference key."""
    require_model()
    require_haproxy()
    work = tmp_path_factory.mktemp("perf-analyzer")
    audit_dir = work / "audit"
    secrets = {"keyring": str(keyring_path.resolve()), "audit_dir": str(audit_dir.resolve()),
               "audit_signing_key": str(signing_key[0].resolve())}
    repo = model_repository_with(work / "repo", {"preprocess": secrets, "postprocess": secrets})
    with TritonServer(repo, audit_dir=str(audit_dir), api_key=GATED_API_KEY, workdir=work / "triton") as srv:
        with Gateway.in_front_of(srv, api_keys=[GATED_API_KEY], workdir=work / "gateway") as gw:
            yield srv, gw, audit_dir, secrets


def get(base: str, path: str, key: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://{base}{path}", headers={"x-api-key": key} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def fields(doc):
    """(field name, value) of every field of a JSON document, nested ones included."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield k, v
            yield from fields(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from fields(v)


def test_budget_counts_the_steps_perf_analyzer_reads():
    """Each of the C threads reads every C-th data step from its own: N requests read steps 0..N-1 once."""
    for n, c in ((20, 2), (101, 2), (10, 3), (7, 7)):
        assert pa.steps_read(n, c) == list(range(n))
        assert pa.envelopes_needed(n, c) == n and pa.max_requests(n, c) == n
    pa.check_budget(20, 2, 20)
    with pytest.raises(pa.ReplayRisk, match="would cycle back to envelopes it has sent.*At most 19 requests"):
        pa.check_budget(20, 2, 19)


def test_snapshot_has_no_parameters_or_paths(stack):
    srv, gw, _, secrets = stack
    docs = model_docs.read(gw.docs_file)
    assert set(model_docs.models_in(docs)) == {"pipeline", *STEPS}
    raw = {m: get(srv.http_url, f"/v2/models/{m}/config")[1].decode() for m in STEPS}
    for step in ("preprocess", "postprocess"):  # the control: Triton's own config holds the paths
        assert all(json.dumps(path)[1:-1] in raw[step] for path in secrets.values()), raw[step][:300]
    assert all('"parameters"' in raw[m] for m in STEPS) and "model.py" in raw["preprocess"]
    text = gw.docs_file.read_text()
    for path in secrets.values():
        assert path not in text and json.dumps(path)[1:-1] not in text
    for name, doc in docs.items():
        found = list(fields(doc))
        assert not [k for k, _ in found if k == "parameters" or model_docs.PATHLIKE_NAME.search(k)], name
        paths = [v for _, v in found if isinstance(v, str) and model_docs.pathlike(v)]
        assert not paths, (name, paths)
        assert not re.search(r"\.(py|onnx|txt|pem|json|jsonl|sqlite3)\b", json.dumps(doc)), name
    # what a client reads is the snapshot, for the pipeline and its steps
    for path in ("/v2/models/pipeline/config", "/v2/models/preprocess/config", "/v2/models/postprocess/versions/1",
                 "/v2/models/classifier_onnx/versions/1/config"):
        status, body = get(gw.http_url, path, GATED_API_KEY)
        assert status == 200 and json.loads(body) == docs[path], (path, status, body[:200])
    status, body = get(gw.http_url, "/v2")  # open, as Triton's: only the extensions the gateway serves
    assert status == 200 and "statistics" not in json.loads(body)["extensions"]


@pytest.mark.parametrize("step", STEPS)
def test_a_step_is_readable_with_the_key_and_never_inferable(stack, keys, step):
    srv, gw, _, _ = stack
    for path in (f"/v2/models/{step}", f"/v2/models/{step}/config", f"/v2/models/{step}/versions/1/config"):
        assert get(gw.http_url, path, GATED_API_KEY)[0] == 200, path
        for key in (None, "wrong-key"):
            status, body = get(gw.http_url, path, key)
            assert status == 401 and b"API key" in body, (path, key, status, body)
    assert get(gw.http_url, f"/v2/models/{step}/versions/2/config", GATED_API_KEY)[0] == 404
    for path in (f"/v2/models/{step}/ready", f"/v2/models/{step}/stats"):
        assert get(gw.http_url, path, GATED_API_KEY)[0] == 403, path
    sealed = envelope.seal(samples.photo("coffee"), keys.key("k1"), key_id="k1", client_id="pa-step",
                              pipeline="pipeline")
    body = json.dumps({"inputs": [{"name": "ENVELOPE", "shape": [1, 1], "datatype": "BYTES",
                                   "data": [sealed.hex()]}]}).encode()
    req = urllib.request.Request(f"http://{gw.http_url}/v2/models/{step}/infer", data=body, method="POST",
                                 headers={"x-api-key": GATED_API_KEY, "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 403 and b"not exposed" in info.value.read()
    # gRPC: a Lua service cannot send gRPC trailers, so a step's config stays refused there
    c = grpcclient.InferenceServerClient(gw.grpc_url)
    for call in (c.get_model_config, c.get_model_metadata):
        with pytest.raises(InferenceServerException) as info:
            call(step, headers=access.headers("grpc", GATED_API_KEY))
        assert str(info.value.status()) == str(grpc.StatusCode.PERMISSION_DENIED), info.value
    c.close()


def test_perf_analyzer_through_the_gateway_audits_each_request_once(stack, keyring_path, tool):
    srv, gw, audit_dir, _ = stack
    mark = len(gw.log_text())
    result = pa.run_level(tool, gw.http_url, gw.metrics_url, gw.workdir, concurrency=2, requests=20, envelopes=20,
                          ring=Keyring.load(keyring_path), image=samples.photo("chelsea"), api_key=GATED_API_KEY,
                          audit_dir=audit_dir, replay_window_s=300, log=lambda m: None)
    assert result["client"]["requests"] == 20 and result["client"]["throughput_per_s"] > 0, result
    assert result["audit"] == {"served": 20, "refused": 0, "refusal_reasons": [], "unique_envelopes": 20,
                               "from_this_level": True, "ok": True}
    assert {s["model"]: s["requests"] for s in result["steps"]} == {"pipeline": 20, **dict.fromkeys(STEPS, 20)}
    log = gw.log_text()[mark:]
    for step in STEPS:  # what it read of a step came from the snapshot; nothing about a step reached Triton
        lines = [ln for ln in log.splitlines() if f"/v2/models/{step}" in ln]
        assert lines and all("replica=<lua.rtinfer_model_doc>" in ln for ln in lines), lines


def test_one_envelope_short_and_perf_analyzer_replays_one(stack, keys, tool, tmp_path):
    """Why the run stops before perf_analyzer starts (check_budget): with one envelope fewer than its
    requests it sends the first one again, and the server refuses it as a replay."""
    srv, gw, audit_dir, _ = stack
    with pytest.raises(pa.ReplayRisk):
        pa.check_budget(6, 2, 5)
    data = tmp_path / "short.json"
    sent = pa.write_input_data(data, 5, key=keys.key("k1"), key_id="k1", client_id="pa-short", pipeline="pipeline",
                               image=samples.photo("chelsea"))
    cmd = pa.command(tool, gw.http_url, data, concurrency=2, requests=6, csv=tmp_path / "short.csv",
                     api_key=GATED_API_KEY)
    out = subprocess.run(cmd, capture_output=True, text=True, env=pa.tool_env(tool), timeout=120)
    assert out.returncode != 0 and "(replay)" in out.stderr, out.stderr[-2000:]
    records = [r for r in audit.read_records(audit_dir) if (r.get("client_id") or r.get("claimed_client_id")) ==
               "pa-short"]
    assert [r.get("reason") for r in records if r.get("event") != "served"] == ["replayed"], records
    served = {r["envelope_sha256"] for r in records if r.get("event") == "served"}
    assert served <= sent and len(served) == len([r for r in records if r.get("event") == "served"])
