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
    ok = subprocess.run([sys.executable, "-m", "rtinfer.audit", "verify", str(tmp_path)], capture_output=True, text=True)
    assert ok.returncode == 0 and "5 records" in ok.stdout
    ls = lines(f)
    del ls[1]
    f.write_text("".join(ls))
    bad = subprocess.run([sys.executable, "-m", "rtinfer.audit", "verify", str(f)], capture_output=True, text=True)
    assert bad.returncode == 1 and "line 2" in bad.stdout
