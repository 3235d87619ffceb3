"""The Locust users and `make loadtest` against a real server (the session's, on free loopback ports)."""
from __future__ import annotations

import csv
import subprocess

from rtinfer import keyring
from rtinfer.launch.server import ROOT

from helpers import locust


def test_locustfile_headless_records_successes_per_protocol(server, keyring_path, tmp_path):
    proc, rows = locust(server, keyring_path, tmp_path / "ok")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for protocol in ("grpc", "http"):
        row = rows[(protocol, "pipeline")]
        assert int(row["Request Count"]) > 0 and int(row["Failure Count"]) == 0, row


def test_locustfile_reports_triton_error_message_as_failure(server, tmp_path):
    wrong = keyring.write_new(tmp_path / "wrong.json", key_ids=("k1",))  # same key id, different key
    proc, rows = locust(server, wrong, tmp_path / "bad", seconds=3, users=2)
    assert proc.returncode != 0  # Locust's own exit code when requests failed
    for protocol in ("grpc", "http"):
        row = rows[(protocol, "pipeline")]
        assert int(row["Failure Count"]) == int(row["Request Count"]) > 0, row
    with open(tmp_path / "bad_failures.csv", newline="") as fh:
        errors = [r["Error"] for r in csv.DictReader(fh)]
    assert errors and all("authentication failed: the envelope does not open" in e for e in errors), errors


def test_make_loadtest_fails_naming_the_impossible_slo(server, keyring_path, tmp_path):
    slo = tmp_path / "impossible.toml"
    slo.write_text("p50_ms = 0.001\nerror_rate = 0.5\n")
    target = f"--grpc {server.grpc_url} --http {server.http_url} --metrics {server.metrics_url}"
    # -o engines-quick -o keys: the session server already proves the model and keyring exist, and the
    # engines-quick step would wait on another build's lock; only the loadtest recipe is under test.
    proc = subprocess.run(["make", "--no-print-directory", "-o", "engines-quick", "-o", "keys", "loadtest",
                           f"KEYRING={keyring_path}", f"SLO={slo}", "DURATION=3s", "USERS=2", "SPAWN_RATE=2",
                           f"LOADTEST_OUT={tmp_path / 'out'}", f"LOADTEST_TARGET={target}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=90)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "SLO check FAILED: p50_ms" in out, out[-3000:]
    assert "FAILED p50_ms: Aggregated" in out and "ok     error_rate: Aggregated = 0" in out, out[-3000:]
    for name in ("summary.md", "breakdown.json", "breakdown.png", "report.html", "locust_stats.csv"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
