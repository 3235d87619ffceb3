"""Audit durability: fsync policies, a writer killed mid-write, rotation across files, signed checkpoints."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from rtinfer import audit, checkpoint

from helpers import wait_until


def recs(n, tag="r"):
    return [{"event": "served", "request_id": f"{tag}{i}"} for i in range(n)]


def all_ok(path, **kw):
    return all(r.ok for reps in audit.verify_path(path, **kw).values() for r in reps)


def test_fsync_policies(tmp_path):
    counts = {}
    for policy in audit.FSYNC_POLICIES:
        w = audit.AuditWriter(tmp_path / f"{policy}.jsonl", fsync=policy, fsync_interval_s=0.05)
        for _ in range(20):
            w.append(recs(4))
        if policy == "interval":  # the background thread syncs what is dirty
            assert wait_until(lambda: w.fsyncs >= 1), "no interval fsync"
        counts[policy] = w.fsyncs
        w.close()
    assert counts["batch"] == 20 and counts["off"] == 0 and 1 <= counts["interval"] < 20, counts
    with pytest.raises(ValueError, match="fsync policy"):
        audit.AuditWriter(tmp_path / "x.jsonl", fsync="sometimes")


def test_bench_measures_every_policy():
    rows = audit.bench(batches=20, batch=4)
    assert [r["policy"] for r in rows] == list(audit.FSYNC_POLICIES) and all(r["us_per_batch"] > 0 for r in rows)


TORN_WRITER = textwrap.dedent("""
    import os, signal, sys
    from rtinfer import audit
    path, keep = sys.argv[1], int(sys.argv[2])
    w = audit.AuditWriter(path)
    w.append([{"event": "served", "request_id": f"before-{i}", "pad": "a" * 100} for i in range(2)])
    print(os.path.getsize(path), flush=True)
    real_write = os.write

    def short_write_then_killed(fd, data):  # the fault: the kernel took part of this write, then the process died
        data = bytes(data)
        print(len(data), flush=True)
        real_write(fd, data[:keep] if keep > 0 else data[:len(data) + keep])
        os.kill(os.getpid(), signal.SIGKILL)

    os.write = short_write_then_killed  # rtinfer.audit writes through os.write
    w.append([{"event": "served", "request_id": f"torn-{i}", "pad": "b" * 100} for i in range(2)])
    print("not killed", flush=True)
""")


@pytest.mark.parametrize("keep", [1, 57, -1, -40], ids=["1 byte", "57 bytes", "all but the newline",
                                                         "all but 40 bytes"])
def test_writer_killed_mid_write_leaves_a_torn_tail_that_restart_repairs(tmp_path, keep):
    """A writer SIGKILLed inside a write of a two-record batch, after exactly ``keep`` bytes of it (negative:
    all but that many) reached the file: verify reports a torn tail (not tampering), the complete lines
    stay, a new writer cuts the partial line off and continues the chain."""
    f = tmp_path / "chain.jsonl"
    proc = subprocess.run([sys.executable, "-c", TORN_WRITER, str(f), str(keep)], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    size_before, batch_len = map(int, proc.stdout.split())  # the file before the batch; the batch's bytes
    tail = f.read_bytes()[size_before:]
    assert len(tail) == (keep if keep > 0 else batch_len + keep)  # the short write, byte for byte
    whole_lines = tail.count(b"\n")  # complete records of the batch that reached the file before the kill
    partial = len(tail) - (tail.rfind(b"\n") + 1)
    assert partial > 0 and whole_lines == (0 if keep > 0 else 1)  # each record's line is over 150 bytes
    rep = audit.verify_file(f)
    assert rep.ok and rep.torn_tail, rep  # a torn tail is not tampering
    assert rep.records == 2 + whole_lines
    w = audit.AuditWriter(f)
    assert w.repaired_bytes == partial and f.stat().st_size == size_before + len(tail) - partial
    w.append([{"event": "served", "request_id": "after"}])
    w.close()
    rep = audit.verify_file(f)
    assert rep.ok and not rep.torn_tail and rep.records == 2 + whole_lines + 1, rep
    assert [r["request_id"] for r in audit.read_records(f)] == ["before-0", "before-1", *["torn-0"][:whole_lines],
                                                                 "after"]
    assert [r["seq"] for r in audit.read_records(f)] == list(range(rep.records))


def test_rotation_continues_the_chain_across_files(tmp_path):
    w = audit.AuditWriter(tmp_path / "pre_0.jsonl", max_bytes=2000)
    for i in range(30):
        w.append(recs(2, f"b{i}-"))
    w.close()
    files = audit.chains(tmp_path)["pre_0"]
    assert len(files) > 3 and files[-1].name == "pre_0.jsonl" and files[0].name == "pre_0.000001.jsonl"
    reports = audit.verify_path(tmp_path)["pre_0"]
    assert all(r.ok for r in reports) and sum(r.records for r in reports) == 60
    seqs = [r["seq"] for r in audit.read_records(tmp_path)]
    assert sorted(seqs) == list(range(60))
    out = subprocess.run([sys.executable, "-m", "rtinfer.audit", "verify", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.count("OK") == len(files)


def test_missing_or_damaged_segment_is_found(tmp_path):
    w = audit.AuditWriter(tmp_path / "c.jsonl", max_bytes=1500)
    for i in range(20):
        w.append(recs(2, f"b{i}-"))
    w.close()
    files = audit.chains(tmp_path)["c"]
    files[1].unlink()  # an attacker drops a whole rotated file
    reports = audit.verify_path(tmp_path)["c"]
    assert not reports[-1].ok and "where the chain stood" in reports[-1].reason
    with open(files[0], "ab") as fh:
        fh.write(b'{"partial')
    reports = audit.verify_path(tmp_path)["c"]
    assert not reports[0].ok and "rotated file" in reports[0].reason


def test_crash_between_rotation_rename_and_first_write(tmp_path):
    w = audit.AuditWriter(tmp_path / "c.jsonl")
    w.append(recs(3))
    w.close()
    os.rename(tmp_path / "c.jsonl", tmp_path / "c.000001.jsonl")  # renamed, new file never written
    w = audit.AuditWriter(tmp_path / "c.jsonl")
    w.append(recs(2, "after"))
    w.close()
    assert all_ok(tmp_path) and [r["seq"] for r in audit.read_records(tmp_path)] == [0, 1, 2, 3, 4]


@pytest.fixture
def signer_files(tmp_path):
    return checkpoint.keygen(tmp_path / "keys" / "sign.pem")


def rechain(lines, keep=lambda r: True, edit=lambda r: r):
    """What someone who can rewrite the whole file does: edit, drop, and recompute every hash."""
    out, prev, seq = [], audit.GENESIS, 0
    for line in lines:
        rec = json.loads(line)
        if not keep(rec):
            continue
        rec = edit(dict(rec, seq=seq, prev=prev))
        rec["hash"] = prev = audit.record_hash(rec)
        seq += 1
        out.append(audit.canonical(rec).decode() + "\n")
    return "".join(out)


def test_signed_checkpoints_defeat_a_whole_file_rewrite(tmp_path, signer_files):
    priv, pub = signer_files
    d = tmp_path / "a"
    w = audit.AuditWriter(d / "post_0.jsonl", signer=checkpoint.Signer.load(priv), checkpoint_records=5)
    for i in range(6):
        w.append(recs(3, f"b{i}-"))
    w.close()  # close signs the tail
    public = checkpoint.load_public(pub)
    reports = audit.verify_path(d, public=public)["post_0"]
    assert reports[0].ok and reports[0].checkpoints == 3 and reports[0].unsigned == 0
    f = d / "post_0.jsonl"
    original = f.read_text().splitlines()

    def forge(r):
        return dict(r, top1="forged") if r.get("request_id") == "b1-0" else r
    f.write_text(rechain(original, edit=forge))
    assert all_ok(d), "a rewritten chain verifies by its hashes alone"
    bad = audit.verify_path(d, public=public)["post_0"][0]
    assert not bad.ok and "checkpoint" in bad.reason

    f.write_text(rechain(original, keep=lambda r: r["event"] != "checkpoint", edit=forge))  # strip signatures
    rep = audit.verify_path(d, public=public)["post_0"][0]
    assert rep.ok and rep.checkpoints == 0 and rep.unsigned == 18
    out = subprocess.run([sys.executable, "-m", "rtinfer.audit", "verify", str(d), "--public-key", str(pub),
                          "--max-unsigned", "0"], capture_output=True, text=True)
    assert out.returncode == 1 and "18 records not covered by a signature" in out.stdout

    f.write_text("\n".join(original) + "\n")
    other_pub = checkpoint.keygen(tmp_path / "other" / "k.pem")[1]
    rep = audit.verify_path(d, public=checkpoint.load_public(other_pub))["post_0"][0]
    assert not rep.ok and "not valid for this public key" in rep.reason


def test_checkpoints_continue_across_rotation_and_on_an_interval(tmp_path, signer_files):
    priv, pub = signer_files
    w = audit.AuditWriter(tmp_path / "c.jsonl", signer=checkpoint.Signer.load(priv), max_bytes=3000,
                          checkpoint_interval_s=0.05, checkpoint_records=10_000)
    w.append(recs(2))
    assert wait_until(lambda: w.checkpoints >= 1)  # an idle writer signs what it wrote
    for i in range(20):
        w.append(recs(2, f"b{i}-"))
    w.close()
    reports = audit.verify_path(tmp_path, public=checkpoint.load_public(pub))["c"]
    assert len(reports) > 2 and all(r.ok for r in reports) and reports[-1].unsigned == 0
    for f in audit.chains(tmp_path)["c"][:-1]:  # every rotated file ends with a signature
        assert json.loads(f.read_text().splitlines()[-1])["event"] == "checkpoint"


def test_signing_key_must_be_private(tmp_path, signer_files):
    priv, _ = signer_files
    os.chmod(priv, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        checkpoint.Signer.load(priv)
    os.chmod(priv, 0o600)
    assert "PRIVATE" not in repr(checkpoint.Signer.load(priv))


FULL_DISK = textwrap.dedent("""
    import json, os, resource, sys, time
    from rtinfer import audit, checkpoint
    path, key = sys.argv[1], sys.argv[2]
    w = audit.AuditWriter(path, signer=checkpoint.Signer.load(key), checkpoint_interval_s=0.05,
                          checkpoint_records=10_000)
    batch = lambda tag: [{"event": "served", "request_id": f"{tag}-{i}", "pad": "x" * 300} for i in range(8)]
    w.append(batch("before"))
    deadline = time.monotonic() + 10
    while w.checkpoints < 1 and time.monotonic() < deadline:  # signed by the background thread
        time.sleep(0.01)
    limit = os.path.getsize(path) + 250  # room for one small record, not for its checkpoint
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))  # the "disk" fills up
    w.append([{"event": "served", "request_id": "small-0"}])
    failed = 0
    for n in range(6):
        try:
            w.append(batch(f"full{n}"))
        except OSError:
            failed += 1
    deadline = time.monotonic() + 10
    while w.write_errors <= failed and time.monotonic() < deadline:  # the background checkpoint fails too,
        time.sleep(0.01)                                               # and must not leave a record behind
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    w.append(batch("after"))
    w.close()
    print(json.dumps({"failed": failed, "errors": w.write_errors}))
""")


def test_file_size_limit_mid_batch_the_chain_continues(tmp_path, signer_files):
    """Issue 14 (6): with the file size limit reached inside a write, the complete records of the
    partial batch stayed on disk while the head went back: the next record did not link and a new
    writer refused to start. Now the partial batch is cut; the chain, the checkpoints and a restart go on."""
    priv, pub = signer_files
    f = tmp_path / "a" / "post_0.jsonl"
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(f), str(priv)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout.splitlines()[-1])
    assert counts["failed"] >= 4 and counts["errors"] > counts["failed"], counts  # + background checkpoints
    public = checkpoint.load_public(pub)
    [rep] = audit.verify_path(f.parent, public=public)["post_0"]
    assert rep.ok and not rep.torn_tail and rep.unsigned == 0, rep
    ids = [r["request_id"] for r in audit.read_records(f) if r["event"] == "served"]
    assert len(ids) == len(set(ids)) and ids[-1] == "after-7"  # no partial batch left, nothing twice
    assert all(len([i for i in ids if i.startswith(f"{t}-")]) in (0, 8)
               for t in ["before", *[f"full{n}" for n in range(6)]])
    assert "small-0" in ids
    w = audit.AuditWriter(f, signer=checkpoint.Signer.load(priv))  # a restart continues
    w.append(recs(1, "restart"))
    w.close()
    assert all_ok(f.parent, public=public)
