"""Client ids bound to keys (issue 20, item 4): the client id in an envelope is a claim of whoever holds the key
that sealed it. A key may claim the ids its keyring entry lists (``clients``); a key without the list only ids
that no key lists. Anything else is refused as ``client_not_allowed`` and audited, and only bound ids take a
metric label slot: one key holder claiming x0..x19 took every slot, and ``'alice\\n'`` passed a '$'-anchored check.
"""
from __future__ import annotations

import json
import urllib.request
import uuid

import pytest
from tritonclient.utils import InferenceServerException

from clients import samples
from clients.classify import PipelineClient
from rtinfer import audit, envelope, keyring, metrics, replay
from rtinfer.preprocess import Preprocessor, Request

from conftest import BOUND_CLIENTS, BOUND_KEY_ID, settled
from helpers import metric_value as value, parse_metrics as parse

PHOTO = samples.photo("coffee")


@pytest.fixture
def ring_file(tmp_path):
    """A real keyring file: 'ka' may claim alice, 'kb' bob, 'legacy' has no list (as older keyrings). The
    bindings are written into the JSON as an operator would (the file format)."""
    path = keyring.write_new(tmp_path / "keyring.json", key_ids=("ka", "kb", "legacy"))
    doc = json.loads(path.read_text())
    doc["keys"]["ka"]["clients"], doc["keys"]["kb"]["clients"] = ["alice"], ["bob"]
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def stage(ring_file, tmp_path):
    pre = Preprocessor(keyring.KeyringSource(ring_file), audit.AuditWriter(tmp_path / "audit" / "pre.jsonl"),
                       pipelines={"pipeline"}, replay=replay.ReplayGuard(tmp_path / "replay.db"))
    yield pre
    pre.audit.close()
    pre.replay.close()


def sealed(ring: keyring.Keyring, key_id: str, client_id: str) -> bytes:
    return envelope.seal(PHOTO, ring.key(key_id), key_id=key_id, client_id=client_id, pipeline="pipeline")


def test_client_ids_are_matched_whole_everywhere(ring_file, stage, tmp_path):
    """'alice\\n' matched the old '$'-anchored pattern: it got a metric label of its own."""
    labels = metrics.ClientLabels(max_dynamic=5)
    assert labels.label("alice\n", authenticated=True) == "other"
    assert not keyring.valid_client_id("alice\n") and keyring.valid_client_id("alice")
    doc = json.loads(ring_file.read_text())
    doc["keys"]["ka"]["clients"] = ["alice\n"]
    with pytest.raises(keyring.KeyringError, match="clients must be a list of client ids"):
        keyring.parse(doc)
    ring = stage.keyring
    [res] = stage.run([Request(sealed(ring, "legacy", "alice\n"), "nl")])
    assert res.reason == "client_not_allowed" and "not a valid client id" in res.detail
    [rec] = audit.read_records(tmp_path / "audit")
    assert rec["reason"] == "client_not_allowed" and rec["claimed_client_id"] == "alice\n" and rec["key_id"] == "legacy"


def test_a_key_claims_only_its_bound_ids_and_an_unbound_key_only_ids_no_key_lists(stage, tmp_path):
    ring = stage.keyring
    cases = {"own": ("ka", "alice", None), "another key's": ("ka", "bob", "client_not_allowed"),
             "unbound, by a bound key": ("ka", "carol", "client_not_allowed"),
             "bound, by an unbound key": ("legacy", "alice", "client_not_allowed"),
             "unbound, by an unbound key": ("legacy", "dave", None),  # keyrings without lists keep working
             "second key's own": ("kb", "bob", None)}
    results = stage.run([Request(sealed(ring, kid, cid), name, client_id=cid) for name, (kid, cid, _) in cases.items()])
    assert [getattr(r, "reason", None) for r in results] == [want for _, _, want in cases.values()]
    written = audit.read_records(tmp_path / "audit")
    assert sorted(r["request_id"] for r in written) == sorted(name for name, (_, _, want) in cases.items() if want)
    records = {r["request_id"]: r for r in written}  # every refusal audited, once; nothing else
    assert records["another key's"]["claimed_client_id"] == "bob" and records["another key's"]["key_id"] == "ka"
    assert "not one of the client ids bound to key id 'ka'" in records["another key's"]["message"]
    assert "bound to other keys" in records["bound, by an unbound key"]["message"]
    public = results[1].public
    assert public == "client id 'bob' may not be used with this key" and "ka" not in public


def test_unbound_ids_take_no_metric_label_slot(ring_file, stage):
    """One key holder claims x0..x19 (accepted: an unbound key may use ids no key lists), then bob comes: the
    20 slots are all still free for the ids a key binds."""
    class Family:
        """Stands in for Triton's pb_utils.MetricFamily: keeps the label sets the real Exporter asks for."""
        COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
        seen: list = []

        def __init__(self, name, description, kind):
            self.name = name

        def Metric(self, labels, **_):  # Triton's name
            Family.seen.append((self.name, labels))
            return type("M", (), {"increment": lambda *a: None, "observe": lambda *a: None, "set": lambda *a: None})()

    exporter = metrics.Exporter(Family, "preprocess", metrics.ClientLabels(max_dynamic=20))
    ring = stage.keyring
    stage.run([Request(sealed(ring, "legacy", f"x{i}"), f"x{i}") for i in range(20)])
    sprayed = stage.last.outcomes
    exporter.report(stage.last, 20)
    stage.run([Request(sealed(ring, "kb", "bob"), "bob")])
    exporter.report(stage.last, 1)
    clients = {labels["client"] for name, labels in Family.seen if name == "rtinfer_requests_total"}
    assert clients == {"other", "bob"}, clients
    assert exporter.clients.admitted == {"bob"}
    assert [o.reason for o in sprayed] == [None] * 20 and not any(o.bound for o in sprayed)
    assert stage.last.outcomes[0].bound


def test_keyring_cli_and_rotation_keep_the_bindings(tmp_path):
    path = tmp_path / "k.json"
    assert keyring.main(["init", str(path), "--key-id", "k1", "--client", "alice", "--client", "alice-batch"]) == 0
    assert keyring.Keyring.load(path).entries()["k1"].clients == ("alice", "alice-batch")
    assert keyring.main(["add", str(path), "--key-id", "k2"]) == 0  # unbound
    assert keyring.main(["bind", str(path), "k2", "bob"]) == 0
    assert keyring.main(["bind", str(path), "k2", "bad id"]) == 2  # refused, file unchanged
    new_id, retired = keyring.rotate(path, grace_s=60)
    ring = keyring.Keyring.load(path)
    assert retired == ["k1", "k2"] and ring.entries()[new_id].clients == ("alice", "alice-batch", "bob")
    assert ring.sealing_key_id("alice") == new_id and ring.may_claim("k1", "alice")  # k1 in grace: still alice's
    keyring.add_key(path, "k9")  # an unbound active key beside bound ones: the next rotation must be told
    with pytest.raises(keyring.KeyringError, match="--client"):
        keyring.rotate(path)
    assert "clients alice,alice-batch,bob" in "\n".join(keyring.describe(path))


def test_client_ids_bound_to_keys_through_the_server(server, keys, audit_dir):
    """The session server (conftest: k1 unbound, BOUND_KEY_ID bound to BOUND_CLIENTS): the bound key is served
    for its own id; its id cannot be claimed by k1, nor can it claim another; 'alice\\n' is refused; k1's
    many unbound ids are served but get no label of their own, the bound id does."""
    own = BOUND_CLIENTS[0]
    run = uuid.uuid4().hex[:8]

    def client(key_id, client_id):
        return PipelineClient(server.grpc_url, key=keys.key(key_id), key_id=key_id, client_id=client_id)

    served = client(BOUND_KEY_ID, own).classify(PHOTO, top_k=1)
    assert served.predictions[0].index == 967
    for key_id, cid in ((BOUND_KEY_ID, f"not-bound-{run}"), ("k1", own), ("k1", "alice\n")):
        c = client(key_id, cid)
        rid = f"bind-{run}-{key_id}-{len(cid)}"
        with pytest.raises(InferenceServerException) as info:
            c.classify(PHOTO, top_k=1, request_id=rid)
        assert "may not be used with this key" in info.value.message(), info.value.message()
        assert str(info.value.status()) == "StatusCode.INVALID_ARGUMENT"
        [rec] = [r for r in audit.read_records(audit_dir) if r.get("request_id") == rid]
        assert rec["event"] == "rejected" and rec["reason"] == "client_not_allowed" and rec["key_id"] == key_id
        assert rec["claimed_client_id"] == cid
    sprayed = [f"spray-{run}-{i}" for i in range(21)]
    for cid in sprayed:  # served: k1 may claim ids no key lists
        client("k1", cid).classify(PHOTO, top_k=1)
    client(BOUND_KEY_ID, own).classify(PHOTO, top_k=1)

    m = settled(lambda: {k: v for k, v in parse(urllib.request.urlopen(server.metrics_url).read().decode()).items()
                         if k[0].startswith(metrics.PREFIX)})
    labels = {dict(ls).get("client") for (n, ls) in m if n == "rtinfer_requests_total"}
    assert not labels & set(sprayed) and "alice\n" not in labels, labels
    for stage in ("preprocess", "postprocess"):
        assert value(m, "rtinfer_requests_total", stage=stage, client=own, outcome="accepted") == 2, stage
    assert value(m, "rtinfer_refusals_total", stage="preprocess", reason="client_not_allowed") == 3
