"""A fleet-wide audit (issue 21, 3): every record and checkpoint names its replica, checkpoints sign the
fleet, and ``python -m rtinfer.audit verify`` over several replicas' directories or a fleet root checks
every chain and signature, counts per replica, and fails on a broken or missing replica, a copied
directory, and a request or envelope served twice. The real writer on temp directories, then a real
tritonserver's trail."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import uuid

import pytest

from clients import samples
from clients.classify import PipelineClient
from rtinfer import audit, checkpoint, stage_config
from rtinfer.launch.server import TritonServer

from conftest import require_model

FLEET = ["r1", "r2", "r3"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    priv, pub = checkpoint.keygen(tmp_path_factory.mktemp("fleet-keys") / "signing.pem")
    return checkpoint.Signer.load(priv), pub


def served(rid: str, env: str | None = None) -> dict:
    return {"event": "served", "stage": "postprocess", "request_id": rid, "client_id": "c",
            "envelope_sha256": env or uuid.uuid4().hex * 2, "top1": {"index": 1}}


def write_replica(root, rid, signer, served_records=(), rejected=1, fleet=FLEET):
    """A replica's directory as its stages leave it: a postprocess and a preprocess chain, signed at close."""
    for chain, recs in (("postprocess_0", list(served_records) or [served(f"{rid}-a"), served(f"{rid}-b")]),
                        ("preprocess_0", [{"event": "rejected", "stage": "preprocess", "request_id": f"{rid}-x",
                                           "reason": "replayed"}] * rejected)):
        w = audit.AuditWriter(root / rid / f"{chain}.jsonl", signer=signer, replica=rid, fleet=fleet)
        w.append(recs)
        w.close()


@pytest.fixture
def fleet_root(tmp_path, keys):
    root = tmp_path / "fleet"
    for rid in FLEET:
        write_replica(root, rid, keys[0])
    return root


def verify_cli(*args):
    return subprocess.run([sys.executable, "-m", "rtinfer.audit", "verify", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_every_record_and_checkpoint_names_its_replica_and_the_fleet(fleet_root):
    recs = audit.read_records(fleet_root / "r2")
    assert recs and {r["replica"] for r in recs} == {"r2"}
    ckpts = [r for r in recs if r["event"] == "checkpoint"]
    assert ckpts and all(c["checkpoint"]["replica"] == "r2" and c["checkpoint"]["fleet"] == FLEET for c in ckpts)


def test_a_fleet_verifies_with_counts_per_replica_and_in_total(fleet_root, keys):
    report = audit.verify_fleet([fleet_root], public=checkpoint.load_public(keys[1]))
    assert report.ok and [r.replica for r in report.replicas] == FLEET
    assert [(r.records, r.served, r.checkpoints) for r in report.replicas] == [(3, 2, 2)] * 3
    assert report.records == 9
    out = verify_cli(fleet_root, "--public-key", keys[1])
    assert out.returncode == 0, out.stdout
    assert "REPLICA r1           OK      3 records (2 served), 2 checkpoints, 2 chains" in out.stdout
    assert "TOTAL   3 replicas, 9 records (6 served)" in out.stdout
    # The same fleet named directory by directory.
    out = verify_cli(*(fleet_root / r for r in FLEET), "--public-key", keys[1])
    assert out.returncode == 0 and "TOTAL   3 replicas, 9 records" in out.stdout


def test_a_deleted_replica_directory_fails_the_fleet(fleet_root, keys):
    """The others' signed checkpoints name r2 as one of the fleet: its directory cannot go unnoticed."""
    shutil.rmtree(fleet_root / "r2")
    out = verify_cli(fleet_root, "--public-key", keys[1])
    assert out.returncode == 1
    assert "replica r2 is missing: checkpoints of r1 name it" in out.stdout
    assert out.stdout.rstrip().endswith("FAILED  r2")
    assert "TOTAL   2 replicas, 6 records" in out.stdout


def test_a_copy_in_place_of_a_deleted_replica_fails(fleet_root, keys):
    shutil.rmtree(fleet_root / "r2")
    shutil.copytree(fleet_root / "r1", fleet_root / "r2")
    report = audit.verify_fleet([fleet_root], public=checkpoint.load_public(keys[1]))
    assert not report.ok and report.failed == ["r1", "r2"]
    messages = [m for m, _ in report.problems]
    assert any("replica r1 is in 2 directories" in m for m in messages)
    assert any("replica r2 is missing" in m for m in messages)


def test_a_broken_chain_fails_its_replica_only(fleet_root, keys):
    f = fleet_root / "r3" / "postprocess_0.jsonl"
    lines = f.read_bytes().split(b"\n")
    lines[0] = lines[0].replace(b'"index":1', b'"index":2')
    f.write_bytes(b"\n".join(lines))
    out = verify_cli(fleet_root, "--public-key", keys[1])
    assert out.returncode == 1
    assert "REPLICA r3           FAILED" in out.stdout and "REPLICA r1           OK" in out.stdout
    assert "hash does not match" in out.stdout and out.stdout.rstrip().endswith("FAILED  r3")


def test_a_request_or_an_envelope_served_twice_across_the_fleet_fails(tmp_path, keys):
    """A retry the gateway sent to a second replica, or a replay the store let through (a Redis crash)."""
    root = tmp_path / "fleet"
    write_replica(root, "r1", keys[0], [served("dup-id"), served("r1-only", env="e" * 64)])
    write_replica(root, "r2", keys[0], [served("dup-id")])
    write_replica(root, "r3", keys[0], [served("r3-only", env="e" * 64)])
    report = audit.verify_fleet([root], public=checkpoint.load_public(keys[1]))
    assert all(r.ok for r in report.replicas) and not report.ok
    messages = [m for m, _ in report.problems]
    assert "request id 'dup-id' was served by 2 replicas (r1, r2)" in messages
    assert any(m.startswith("envelope eeeeeeeeeeeeeeee... was served 2 times (r1, r3)") for m in messages)
    assert report.failed == FLEET
    out = verify_cli(root)
    assert out.returncode == 1 and "a replay was let through" in out.stdout


def test_a_checkpoint_signs_the_replica_its_record_names(tmp_path, keys):
    """A checkpoint record moved to another replica's name (re-hashed; the signature untouched) is refused."""
    d = tmp_path / "r1"
    write_replica(tmp_path, "r1", keys[0])
    f = d / "postprocess_0.jsonl"
    lines = f.read_bytes().rstrip(b"\n").split(b"\n")
    last = json.loads(lines[-1])
    assert last["event"] == "checkpoint"
    last["replica"] = "r9"
    last["hash"] = audit.record_hash(last)
    f.write_bytes(b"\n".join(lines[:-1] + [audit.canonical(last)]) + b"\n")
    [rep] = audit.verify_path(d, public=checkpoint.load_public(keys[1]))["postprocess_0"]
    assert not rep.ok and rep.reason == "checkpoint signs another replica than its record names"


def test_directories_that_name_no_replica_or_several(tmp_path, keys):
    root = tmp_path / "fleet"
    write_replica(root, "r1", keys[0], fleet=None)
    old = audit.AuditWriter(root / "legacy" / "postprocess_0.jsonl")  # written before replicas had ids
    old.append([served("legacy-1")])
    old.close()
    audit.AuditWriter(root / "idle" / "postprocess_0.jsonl").close()  # started, never served: no record
    mixed = audit.AuditWriter(root / "r1" / "postprocess_1.jsonl", replica="r2")
    mixed.append([served("mixed")])
    mixed.close()
    (root / "not-audit").mkdir()  # a fleet root's other subdirectories are not replicas
    report = audit.verify_fleet([root])
    by_path = {r.path.rsplit("/", 1)[-1]: r for r in report.replicas}
    assert sorted(by_path) == ["idle", "legacy", "r1"]
    assert by_path["idle"].ok and by_path["idle"].records == 0
    assert "name no replica" in by_path["legacy"].problems[0]
    assert "several replicas in one directory (r1, r2)" in by_path["r1"].problems[0]


def test_a_fleet_root_with_no_replica_fails(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert not audit.verify_fleet([tmp_path / "a", tmp_path / "a"]).ok
    out = verify_cli(tmp_path / "a", tmp_path / "a")
    assert out.returncode == 1 and "no replica audit directory" in out.stdout


def test_the_replica_id_and_the_fleet_come_from_the_environment(monkeypatch):
    monkeypatch.delenv(stage_config.ENV_REPLICA, raising=False)
    monkeypatch.delenv(stage_config.ENV_FLEET, raising=False)
    assert stage_config.replica_id() == socket.gethostname() and stage_config.fleet_replicas() is None
    monkeypatch.setenv(stage_config.ENV_REPLICA, "r7")
    monkeypatch.setenv(stage_config.ENV_FLEET, " r2,r1 ,,r7")
    assert stage_config.replica_id() == "r7" and stage_config.fleet_replicas() == ["r1", "r2", "r7"]
    for bad in ("../r1", "r 1", "", "-x"):
        monkeypatch.setenv(stage_config.ENV_REPLICA, bad)
        if bad:
            with pytest.raises(ValueError, match="must match"):
                stage_config.replica_id()
    monkeypatch.setenv(stage_config.ENV_FLEET, "r1,../r2")
    with pytest.raises(ValueError, match="must match"):
        stage_config.fleet_replicas()


def test_a_real_servers_trail_is_a_replica_of_its_fleet(keyring_path, signing_key, tmp_path):
    """A tritonserver as replica ra of fleet (ra, rb): its records and checkpoints name ra, the fleet verify
    fails while rb's directory is missing and passes once it is there."""
    require_model()
    root = tmp_path / "fleet"
    with TritonServer(keyring=str(keyring_path), audit_dir=str(root / "ra"), audit_signing_key=str(signing_key[0]),
                      workdir=tmp_path / "triton",
                      env={"RTINFER_REPLICA_ID": "ra", "RTINFER_FLEET_REPLICAS": "rb,ra"}) as srv:
        from rtinfer.keyring import Keyring
        c = PipelineClient(srv.grpc_url, key=Keyring.load(keyring_path).key("k1"), key_id="k1", client_id="fleet")
        rids = [c.classify(samples.photo("coffee")).request_id for _ in range(2)]
        c.close()
    # stopped: each stage signed a last checkpoint at close
    recs = audit.read_records(root / "ra")
    assert {r["replica"] for r in recs} == {"ra"}
    assert {r["request_id"] for r in recs if r["event"] == "served"} == set(rids)
    assert all(r["checkpoint"]["fleet"] == ["ra", "rb"] for r in recs if r["event"] == "checkpoint")
    out = verify_cli(root, "--public-key", signing_key[1])
    assert out.returncode == 1 and "replica rb is missing" in out.stdout
    write_replica(root, "rb", checkpoint.Signer.load(signing_key[0]), fleet=["ra", "rb"])
    out = verify_cli(root, "--public-key", signing_key[1])
    assert out.returncode == 0, out.stdout
    assert "REPLICA ra           OK      2 records (2 served)" in out.stdout
    assert "TOTAL   2 replicas, 5 records (4 served)" in out.stdout
