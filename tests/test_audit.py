"""The audit chain: N records verify, and any edit, deletion or reordering is found at its line."""
import json
import subprocess
import sys

import pytest

from rtinfer import audit


def write(path, n, batch=3):
    w = audit.AuditWriter(path)
    recs = [{"event": "served", "request_id": f"r{i}"} for i in range(n)]
    for i in range(0, n, batch):
        w.append(recs[i:i + batch])
    w.close()


def test_n_records_verify(tmp_path):
    f = tmp_path / "a.jsonl"
    write(f, 10)
    rep = audit.verify_file(f)
    assert rep.ok and rep.records == 10 and not rep.torn_tail
    assert [r["request_id"] for r in audit.read_records(f)] == [f"r{i}" for i in range(10)]


def test_chain_continues_after_reopen(tmp_path):
    f = tmp_path / "a.jsonl"
    write(f, 4)
    write(f, 3)
    rep = audit.verify_file(f)
    assert rep.ok and rep.records == 7


def lines(f):
    return f.read_text().splitlines(keepends=True)


def test_edit_detected(tmp_path):
    f = tmp_path / "a.jsonl"
    write(f, 6)
    ls = lines(f)
    rec = json.loads(ls[3])
    rec["request_id"] = "forged"
    ls[3] = json.dumps(rec) + "\n"
    f.write_text("".join(ls))
    rep = audit.verify_file(f)
    assert not rep.ok and rep.broken_at == 4 and "edited" in rep.reason


def test_edit_with_recomputed_hash_detected_at_next_line(tmp_path):
    f = tmp_path / "a.jsonl"
    write(f, 6)
    ls = lines(f)
    rec = json.loads(ls[2])
    rec["top1"] = "forged"
    rec["hash"] = audit.record_hash(rec)
    ls[2] = audit.canonical(rec).decode() + "\n"
    f.write_text("".join(ls))
    rep = audit.verify_file(f)
    assert not rep.ok and rep.broken_at == 4 and "deleted, inserted" in rep.reason


def test_deletion_detected(tmp_path):
    f = tmp_path / "a.jsonl"
    write(f, 6)
    ls = lines(f)
    del ls[2]
    f.write_text("".join(ls))
    rep = audit.verify_file(f)
    assert not rep.ok and rep.broken_at == 3


def test_torn_tail_reported_and_repaired(tmp_path):
    f = tmp_path / "a.jsonl"
    write(f, 3)
    with open(f, "ab") as fh:
        fh.write(b'{"event": "served", "req')
    rep = audit.verify_file(f)
    assert rep.ok and rep.torn_tail and rep.records == 3
    w = audit.AuditWriter(f)
    assert w.repaired_bytes > 0
    w.append([{"event": "served"}])
    w.close()
    rep = audit.verify_file(f)
    assert rep.ok and not rep.torn_tail and rep.records == 4


def test_second_writer_on_same_file_refused(tmp_path):
    f = tmp_path / "a.jsonl"
    w = audit.AuditWriter(f)
    with pytest.raises(BlockingIOError):
        audit.AuditWriter(f)
    w.close()


def test_cli_reports_first_broken_link(tmp_path):
    f = tmp_path / "a.jsonl"
    write(f, 5)
    ok = subprocess.run([sys.executable, "-m", "rtinfer.audit", "verify", str(tmp_path)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "5 records" in ok.stdout
    ls = lines(f)
    del ls[1]
    f.write_text("".join(ls))
    bad = subprocess.run([sys.executable, "-m", "rtinfer.audit", "verify", str(f)], capture_output=True, text=True)
    assert bad.returncode == 1 and "line 2" in bad.stdout


def verify_cli(*args):
    return subprocess.run([sys.executable, "-m", "rtinfer.audit", "verify", *map(str, args)],
                          capture_output=True, text=True)


def test_empty_directory_does_not_verify(tmp_path):
    """Issue 14 (5): an empty directory passed with rc 0, even with --max-unsigned 0."""
    out = verify_cli(tmp_path, "--max-unsigned", "0")
    assert out.returncode == 1 and "no audit chain" in out.stdout
    assert not all(r.ok for reps in audit.verify_path(tmp_path).values() for r in reps)


def test_a_deleted_chain_named_by_a_checkpoint_is_found(tmp_path):
    """Issue 14 (5): deleting one instance's whole chain (every served record) passed. Checkpoints
    sign the chains present, so the others' checkpoints name the missing one."""
    from rtinfer import checkpoint
    priv, pub = checkpoint.keygen(tmp_path / "keys" / "k.pem")
    d = tmp_path / "audit"
    writers = [audit.AuditWriter(d / f"{name}.jsonl", signer=checkpoint.Signer.load(priv))
               for name in ("preprocess_0_0", "postprocess_0_0")]
    for w in writers:
        w.append([{"event": "served", "request_id": "r1"}])
    for w in writers:
        w.close()  # each signs a checkpoint naming both chains
    assert verify_cli(d, "--public-key", pub).returncode == 0
    (d / "postprocess_0_0.jsonl").unlink()
    out = verify_cli(d, "--public-key", pub)
    assert out.returncode == 1 and "chain postprocess_0_0 is missing" in out.stdout, out.stdout


def test_duplicate_keys_and_non_canonical_lines_do_not_verify(tmp_path):
    """Issue 14 (8): a line with a second client_id verified (the last one is hashed), while a
    first-key-wins reader sees the forged value. Every line must be its canonical form."""
    f = tmp_path / "a.jsonl"
    w = audit.AuditWriter(f)
    w.append([{"event": "served", "client_id": "alice", "request_id": "r0"}, {"event": "served", "request_id": "r1"}])
    w.close()
    original = lines(f)
    forged = original[0].replace('{', '{"client_id":"bob",', 1)
    assert json.loads(forged)["client_id"] == "alice"  # what the hash covers
    f.write_text(forged + original[1])
    rep = audit.verify_file(f)
    assert not rep.ok and rep.broken_at == 1 and "duplicate key" in rep.reason
    f.write_text(original[0].replace(',', ', ', 1) + original[1])  # same record, other spacing
    rep = audit.verify_file(f)
    assert not rep.ok and rep.broken_at == 1 and "canonical" in rep.reason


def test_audit_files_are_private(tmp_path):
    f = tmp_path / "a.jsonl"
    write(f, 1)
    assert f.stat().st_mode & 0o777 == 0o600
    f.chmod(0o640)  # a trail from before: tightened when a writer opens it
    write(f, 1)
    assert f.stat().st_mode & 0o777 == 0o600


def test_a_string_utf8_cannot_hold_does_not_break_the_write(tmp_path):
    """A lone surrogate (a JSON escape a client can send in a parameter) must not fail the batch's write."""
    f = tmp_path / "a.jsonl"
    w = audit.AuditWriter(f)
    w.append([{"event": "rejected", "client_id": "bad\udc80id"}, {"event": "served", "request_id": "r1"}])
    w.close()
    assert audit.verify_file(f).ok and [r["request_id"] for r in audit.read_records(f)[1:]] == ["r1"]
