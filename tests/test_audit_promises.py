"""Audit promises of docs/formats.md "Verifying the audit trail" and of rtinfer/audit.py's docstring that no other
test exercised (issue 23, 4): records swapped in place are found ("reordering"), and a new audit directory is made
0700, by the writer and by a real server whose audit directory did not exist.

Everything runs on the real AuditWriter, verifier, CLI and signer on temp directories.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clients import samples
from clients.classify import PipelineClient
from rtinfer import audit, checkpoint
from rtinfer.launch.server import TritonServer

from conftest import require_model


def write(path: Path, n: int, batch: int = 1, **kw) -> list[dict]:
    w = audit.AuditWriter(path, **kw)
    for i in range(0, n, batch):
        w.append([{"event": "served", "request_id": f"r{j}", "top1": {"index": j}}
                  for j in range(i, min(n, i + batch))])
    w.close()
    return audit.read_records(path)


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def swap(path: Path, i: int, j: int) -> None:
    """Swap lines ``i`` and ``j`` (0-based) in place: every record stays byte for byte as the writer wrote it."""
    ls = lines(path)
    ls[i], ls[j] = ls[j], ls[i]
    path.write_bytes(b"".join(ls))


def verify_cli(path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rtinfer.audit", "verify", str(path), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------ reordering

@pytest.mark.parametrize("i, j", [(2, 3), (0, 1), (0, 5), (4, 5)],
                         ids=["middle", "first-two", "first-last", "last-two"])
def test_records_swapped_in_place_are_found(tmp_path, i, j):
    f = tmp_path / "preprocess_0_0.jsonl"
    before = write(f, 6)
    assert audit.verify_file(f).ok
    swap(f, i, j)
    after = audit.read_records(f)
    assert sorted(map(json.dumps, after)) == sorted(map(json.dumps, before))  # the same records, each intact
    assert all(audit.record_hash(r) == r["hash"] for r in after)  # every record's own hash still holds
    rep = audit.verify_file(f)
    assert not rep.ok and rep.broken_at == i + 1, rep
    assert rep.records == i  # verified up to the first moved record, not past it
    [[dir_rep]] = audit.verify_path(tmp_path).values()
    assert not dir_rep.ok and dir_rep.broken_at == i + 1
    out = verify_cli(tmp_path)
    assert out.returncode == 1 and f"line {i + 1}:" in out.stdout and "BROKEN" in out.stdout, out.stdout


def test_records_of_one_group_commit_swapped_are_found(tmp_path):
    """Records of one execute() are written in one write(): swapping two of them is still a reordering."""
    f = tmp_path / "postprocess_0_0.jsonl"
    write(f, 6, batch=3)
    swap(f, 3, 4)
    rep = audit.verify_file(f)
    assert not rep.ok and rep.broken_at == 4


def test_rotated_segments_swapped_are_found(tmp_path):
    """Reordering whole files: two rotated segments exchange names (each file intact on its own)."""
    d = tmp_path / "audit"
    w = audit.AuditWriter(d / "preprocess_0_0.jsonl", max_bytes=1)  # rotates after every write
    for i in range(4):
        w.append([{"event": "served", "request_id": f"r{i}"}])
    w.close()
    segs = sorted(d.glob("preprocess_0_0.0*.jsonl"))
    assert len(segs) >= 3 and all(audit.verify_file(s, prev=None, seq=None).ok for s in segs)
    assert all(r.ok for reps in audit.verify_path(d).values() for r in reps)
    tmp = d / "tmp.swap"
    segs[1].rename(tmp)
    segs[2].rename(segs[1])
    tmp.rename(segs[2])
    reports = audit.verify_path(d)["preprocess_0_0"]
    assert not reports[-1].ok and reports[-1].path == str(segs[1]) and reports[-1].broken_at == 1
    assert verify_cli(d).returncode == 1


def rechain(path: Path) -> None:
    """What a forger with write access does after reordering: renumber and re-hash every record so that the
    chain holds again (checkpoints keep their signed content: the forger has no signing key)."""
    prev, out = audit.GENESIS, []
    for seq, line in enumerate(lines(path)):
        rec = json.loads(line)
        rec.update(seq=seq, prev=prev)
        rec["hash"] = prev = audit.record_hash(rec)
        out.append(audit.canonical(rec) + b"\n")
    path.write_bytes(b"".join(out))


def test_swapped_and_rechained_records_are_found_by_the_signed_checkpoint(tmp_path):
    priv, pub = checkpoint.keygen(tmp_path / "keys" / "signing.pem")
    d = tmp_path / "audit"
    f = d / "preprocess_0_0.jsonl"
    recs = write(f, 6, signer=checkpoint.Signer.load(priv), checkpoint_records=3)
    kinds = [r["event"] for r in recs]
    assert kinds.index("checkpoint") == 3, kinds  # r0 r1 r2 C r3 r4 r5 C
    assert verify_cli(d, "--public-key", pub).returncode == 0
    swap(f, 0, 1)
    rechain(f)
    assert audit.verify_file(f).ok  # the chain alone cannot tell: this is what the signatures are for
    rep = audit.verify_file(f, public=checkpoint.load_public(pub))
    assert not rep.ok and rep.broken_at == 4 and "checkpoint" in rep.reason, rep
    out = verify_cli(d, "--public-key", pub)
    assert out.returncode == 1 and "line 4:" in out.stdout, out.stdout


# ------------------------------------------------------------------ a new audit directory is 0700

@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077], ids=["umask-000", "umask-022", "umask-077"])
def test_the_writer_makes_a_new_audit_directory_0700(tmp_path, umask):
    d = tmp_path / "new" / "audit"
    old = os.umask(umask)
    try:
        w = audit.AuditWriter(d / "preprocess_0_0.jsonl")
        w.append([{"event": "served", "request_id": "r0"}])
        w.close()
    finally:
        os.umask(old)
    assert d.stat().st_mode & 0o777 == 0o700
    assert (d / "preprocess_0_0.jsonl").stat().st_mode & 0o777 == 0o600


def test_the_writer_leaves_an_existing_directory_as_it_is(tmp_path):
    """Only a directory the writer makes is narrowed: an operator's existing directory (e.g. group-readable
    for a log shipper) keeps its mode."""
    d = tmp_path / "existing"
    d.mkdir()
    d.chmod(0o750)
    write(d / "a.jsonl", 1)
    assert d.stat().st_mode & 0o777 == 0o750


def test_a_server_makes_its_new_audit_directory_0700(keyring_path, keys, tmp_path):
    """The stages create the directory (audit writer, replay and context stores): it is 0700 whichever
    of them came first, with the server started under a permissive umask."""
    require_model()
    d = tmp_path / "fresh" / "audit"
    old = os.umask(0o002)  # the server inherits it
    try:
        server = TritonServer(keyring=str(keyring_path), audit_dir=str(d), workdir=tmp_path / "triton").start()
    finally:
        os.umask(old)
    try:
        c = PipelineClient(server.grpc_url, key=keys.key("k1"), key_id="k1", client_id="audit-dir")
        res = c.classify(samples.photo("coffee"), top_k=1)
        c.close()
        assert res.predictions[0].index == 967
    finally:
        server.stop()
    assert d.stat().st_mode & 0o777 == 0o700, oct(d.stat().st_mode)
    files = sorted(p.name for p in d.iterdir())
    assert any(n.startswith("preprocess") and n.endswith(".jsonl") for n in files), files
    assert [rec for rec in audit.read_records(d) if rec.get("request_id") == res.request_id]
