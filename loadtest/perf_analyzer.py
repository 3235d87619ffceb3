"""`make perf-analyzer`: NVIDIA's perf_analyzer against the pipeline, through the gateway's front door.

    python -m loadtest.perf_analyzer [--concurrency 1,2] [--requests 500] [--out build/perf_analyzer]

Starts its own tritonserver and gateway on free loopback ports (an inference key made for the run, as
`make serve API_KEY_FILE=...` would check it), then for each concurrency level:

1. seals ``--envelopes`` unique envelopes (default: as many as the level can read, below) of one photo and
   writes them as perf_analyzer's ``--input-data`` JSON: ENVELOPE is BYTES, so each entry is
   ``{"b64": ...}`` of the serialized tensor (4-byte little-endian length, then the envelope);
2. runs ``perf_analyzer -i http`` through the gateway with ``--request-count`` (count windows: one
   measurement of exactly that many requests), with the key as ``-H x-api-key:...``;
3. reads the per-step times from Triton's metrics through the gateway's metrics port (the gateway does not
   serve Triton's statistics API, so perf_analyzer prints no server-side breakdown itself), and checks the
   audit trail: every request served and audited once, no envelope refused (no replay).

Envelopes are single-use (the stages refuse a nonce they have seen: docs/security.md), so perf_analyzer
must never come back to an entry it has sent; past the last entry it starts again at the first. With the
settings used here (synchronous calls, so one thread per concurrent request, batch size 1: ``--sync
-b 1``) it spreads ``--request-count`` N over the C threads, N // C each and one more for the
first N % C, and thread t reads the data steps t, t + C, t + 2C, ...: together the steps 0 to N - 1, each
once. So a level of N requests needs N envelopes, and E envelopes allow at most E requests; past that the
run stops here, before perf_analyzer starts, saying so (tests/test_perf_analyzer.py shows one envelope
fewer ending in a replay refused by the server). Each level must also end within the stages' replay window
after its envelopes were sealed (300 s: older envelopes are refused as expired): perf_analyzer is stopped
then, saying so.

Writes, under --out: perf_analyzer.json (per level: throughput, latencies, per-step times, the audit check,
the command), perf_analyzer.md (the table in docs/performance.md "perf_analyzer") and perf_analyzer's own CSV
per level (c<C>.csv). The input data is deleted after each level (its envelopes are spent).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

from clients import samples
from loadtest import metrics
from rtinfer import audit, envelope
from rtinfer.keyring import Keyring
from rtinfer.launch.server import ROOT, TritonServer, model_params

TOOL_SCRIPT = ROOT / "deploy" / "perf_analyzer" / "require-perf-analyzer.sh"
TOOL_DIR = ROOT / "build" / "perf_analyzer" / "tool"
OUT = ROOT / "build" / "perf_analyzer"
CLIENT_ID = "perf-analyzer"


class ReplayRisk(SystemExit):
    """perf_analyzer would read an envelope twice: stopped before it starts."""


def steps_read(requests: int, concurrency: int) -> list[int]:
    """The data steps perf_analyzer reads for ``requests`` at ``concurrency`` (``--sync -b 1``: one thread per
    concurrent request): thread t sends N // C requests (one more when t < N % C) and reads steps t, t + C, ..."""
    per_thread = [requests // concurrency + (t < requests % concurrency) for t in range(concurrency)]
    return sorted(t + concurrency * i for t in range(concurrency) for i in range(per_thread[t]))


def envelopes_needed(requests: int, concurrency: int) -> int:
    """Envelopes a level reads: one past its highest data step (= the requests: each step once)."""
    return max(steps_read(requests, concurrency)) + 1


def max_requests(envelopes: int, concurrency: int) -> int:
    """The most requests ``envelopes`` allow at ``concurrency`` without perf_analyzer cycling to an envelope
    it has sent (the highest step it reads must be below ``envelopes``)."""
    n = envelopes
    while n > 0 and envelopes_needed(n, concurrency) > envelopes:
        n -= 1
    return n


def check_budget(requests: int, concurrency: int, envelopes: int) -> None:
    if requests < concurrency:
        raise ReplayRisk(f"perf-analyzer: {requests} requests at concurrency {concurrency}: at least one per thread")
    if requests > max_requests(envelopes, concurrency):
        raise ReplayRisk(
            f"perf-analyzer: stopped before perf_analyzer started: {requests} requests at concurrency {concurrency} "
            f"read {envelopes_needed(requests, concurrency)} data steps, but there are {envelopes} unique envelopes: "
            f"perf_analyzer would cycle back to envelopes it has sent, which the server refuses as replays. "
            f"At most {max_requests(envelopes, concurrency)} requests with {envelopes} envelopes "
            f"(raise --envelopes, or lower --requests).")


def tool(directory: Path = TOOL_DIR) -> Path:
    """perf_analyzer's directory (bin/, lib/), unpacked from the pinned wheels when missing."""
    out = subprocess.run([str(TOOL_SCRIPT), str(directory)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHON": sys.executable})
    if out.returncode != 0:
        raise SystemExit(f"perf-analyzer: {TOOL_SCRIPT.relative_to(ROOT)} failed (above)")
    return Path(out.stdout.strip().splitlines()[-1])


def tool_env(directory: Path) -> dict:
    lib = str(directory / "lib")
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(p for p in (lib, os.environ.get("LD_LIBRARY_PATH")) if p)}


def write_input_data(path: Path, n: int, *, key: bytes, key_id: str, client_id: str, pipeline: str,
                     image: bytes) -> set[str]:
    """``n`` freshly sealed envelopes of ``image`` as perf_analyzer input data; their SHA-256 (hex)."""
    hashes, entries = set(), []
    for _ in range(n):
        sealed = envelope.seal(image, key, key_id=key_id, client_id=client_id, pipeline=pipeline)
        hashes.add(hashlib.sha256(sealed).hexdigest())
        tensor = struct.pack("<I", len(sealed)) + sealed  # a BYTES tensor of one element, serialized
        entries.append({"ENVELOPE": {"b64": base64.b64encode(tensor).decode()}})
    if len(hashes) != n:
        raise RuntimeError("two envelopes came out equal")
    path.write_text(json.dumps({"data": entries}))
    return hashes


def command(directory: Path, url: str, data: Path, *, concurrency: int, requests: int, csv: Path,
            api_key: str = "", model: str = "pipeline") -> list[str]:
    cmd = [str(directory / "bin" / "perf_analyzer"), "-m", model, "-u", url, "-i", "http",
           "--input-data", str(data), "--concurrency-range", str(concurrency),
           "--sync", "-b", "1",  # what steps_read assumes: one thread per concurrent request, batch 1
           "--request-count", str(requests),  # exactly this many requests, one measurement
           "--measurement-mode", "count_windows", "--measurement-request-count", str(requests), "-f", str(csv)]
    if api_key:
        cmd += ["-H", f"x-api-key:{api_key}"]  # perf_analyzer takes headers only from its command line
    return cmd


def parse_output(text: str) -> dict:
    """perf_analyzer's client-side summary (usec -> ms)."""
    def num(pattern):
        m = re.search(pattern, text)
        return float(m.group(1)) if m else None
    out = {"requests": num(r"Request count: (\d+)"), "throughput_per_s": num(r"Throughput: ([\d.]+) infer/sec")}
    for name, pattern in (("avg", r"Avg latency: (\d+) usec"), ("p50", r"p50 latency: (\d+) usec"),
                          ("p90", r"p90 latency: (\d+) usec"), ("p95", r"p95 latency: (\d+) usec"),
                          ("p99", r"p99 latency: (\d+) usec")):
        value = num(pattern)
        out[f"{name}_ms"] = round(value / 1000, 2) if value is not None else None
    if out["requests"] is not None:
        out["requests"] = int(out["requests"])
    return out


def audited(audit_dir: Path, client_id: str, sent: set[str], expected: int, wait: float = 10.0) -> dict:
    """This level's audit records: served once per request, from the envelopes written, none refused."""
    deadline = time.monotonic() + wait
    while True:
        records = [r for r in audit.read_records(audit_dir)
                   if r.get("client_id") == client_id or r.get("claimed_client_id") == client_id]
        served = [r for r in records if r.get("event") == "served"]
        if len(served) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    hashes = [r.get("envelope_sha256") for r in served]
    return {"served": len(served), "refused": len(records) - len(served),
            "refusal_reasons": sorted({str(r.get("reason")) for r in records if r.get("event") != "served"}),
            "unique_envelopes": len(set(hashes)), "from_this_level": all(h in sent for h in hashes),
            "ok": len(served) == expected == len(set(hashes)) and len(records) == len(served)
            and all(h in sent for h in hashes)}


def run_level(directory: Path, url: str, metrics_url: str, out: Path, *, concurrency: int, requests: int,
              envelopes: int, ring: Keyring, image: bytes, api_key: str, audit_dir: Path | None,
              replay_window_s: float, log=print) -> dict:
    check_budget(requests, concurrency, envelopes)
    client_id = f"{CLIENT_ID}-c{concurrency}-{secrets.token_hex(3)}"
    key_id = ring.sealing_key_id(client_id)
    data, csv = out / f"input-c{concurrency}.json", out / f"c{concurrency}.csv"
    sealed_at = time.time()
    sent = write_input_data(data, envelopes, key=ring.key(key_id), key_id=key_id, client_id=client_id,
                            pipeline="pipeline", image=image)
    budget = replay_window_s - (time.time() - sealed_at) - 10  # the oldest envelope must still be fresh
    cmd = command(directory, url, data, concurrency=concurrency, requests=requests, csv=csv, api_key=api_key)
    shown = " ".join(cmd).replace(api_key, "<key>") if api_key else " ".join(cmd)
    log(f"perf-analyzer: concurrency {concurrency}: {requests} requests, {envelopes} unique envelopes "
        f"(highest data step read: {envelopes_needed(requests, concurrency) - 1}); at most {budget:.0f} s")
    before = metrics.scrape(metrics_url)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=tool_env(directory), timeout=budget)
    except subprocess.TimeoutExpired as exc:
        raise SystemExit(f"perf-analyzer: perf_analyzer did not finish within {budget:.0f} s, while its envelopes "
                         f"are fresh (replay window {replay_window_s:.0f} s): lower --requests") from exc
    finally:
        data.unlink(missing_ok=True)  # spent: every envelope in it is now a replay
    wall = time.monotonic() - t0
    (out / f"c{concurrency}.log").write_text(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"perf-analyzer: perf_analyzer failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    stages = metrics.breakdown(before, metrics.scrape(metrics_url))
    result = {"concurrency": concurrency, "requests": requests, "envelopes": envelopes, "wall_s": round(wall, 1),
              "client": parse_output(proc.stdout), "steps": [s.row() for s in stages], "command": shown}
    if audit_dir is not None:
        result["audit"] = audited(audit_dir, client_id, sent, requests)
        if not result["audit"]["ok"]:
            raise SystemExit(f"perf-analyzer: the audit does not show each request served once: {result['audit']}")
    return result


def markdown(results: list[dict], hardware: str) -> str:
    head = ("| concurrency | requests | throughput (infer/s) | avg ms | p50 ms | p90 ms | p95 ms | p99 ms |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = [f"| {r['concurrency']} | {r['client']['requests']} | {r['client']['throughput_per_s']:.1f} | "
            f"{r['client']['avg_ms']:.1f} | {r['client']['p50_ms']:.1f} | {r['client']['p90_ms']:.1f} | "
            f"{r['client']['p95_ms']:.1f} | {r['client']['p99_ms']:.1f} |" for r in results]
    parts = [f"perf_analyzer (tritonclient 2.50.0) through the gateway over HTTP, {hardware}.", "", head, *rows]
    for r in results:
        parts += ["", f"Per step at concurrency {r['concurrency']} (Triton's metrics, through the gateway's "
                      "metrics port):", "", metrics.markdown([metrics.Stage(**s) for s in r["steps"]])]
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.perf_analyzer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keyring", type=Path, default=ROOT / "build" / "keys" / "keyring.json")
    p.add_argument("--concurrency", default="1,2", help="levels, comma-separated (one perf_analyzer run each)")
    p.add_argument("--requests", type=int, default=500, help="requests per level")
    p.add_argument("--envelopes", type=int, default=0,
                   help="unique envelopes per level (0: as many as the level reads); fewer than the requests "
                   "need stops the run before perf_analyzer starts")
    p.add_argument("--photo", default="chelsea", help="the shipped photo every envelope carries")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--tool", type=Path, default=TOOL_DIR, help="where perf_analyzer is unpacked")
    p.add_argument("--hardware", default=f"{os.cpu_count()}-core {platform.machine()}, no GPU",
                   help="how the report names this machine")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    for c in levels:  # before anything starts
        check_budget(args.requests, c, args.envelopes or envelopes_needed(args.requests, c))
    if not args.keyring.exists():
        raise SystemExit(f"perf-analyzer: no keyring at {args.keyring}: run `make keys`")
    directory = tool(args.tool)
    from rtinfer.launch.gateway import Gateway, haproxy_binary
    haproxy_binary()
    ring, image = Keyring.load(args.keyring), samples.photo(args.photo)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "server"
    shutil.rmtree(work, ignore_errors=True)
    api_key = secrets.token_hex(16)
    results = []
    with TritonServer(keyring=str(args.keyring), audit_dir=str(work / "audit"), api_key=api_key,
                      workdir=work / "triton") as server:
        window = float(model_params(server.model_repository, "preprocess", server.config_name)["replay_window_s"])
        with Gateway.in_front_of(server, api_keys=[api_key], workdir=work / "gateway") as gw:
            print(f"perf-analyzer: tritonserver {server.http_url} behind the gateway {gw.http_url} "
                  f"(metrics {gw.metrics_url}); audit in {work / 'audit'}", flush=True)
            for c in levels:
                r = run_level(directory, gw.http_url, gw.metrics_url, args.out, concurrency=c,
                              requests=args.requests, envelopes=args.envelopes or envelopes_needed(args.requests, c),
                              ring=ring, image=image, api_key=api_key, audit_dir=work / "audit",
                              replay_window_s=window, log=lambda m: print(m, flush=True))
                cl = r["client"]
                print(f"perf-analyzer: concurrency {c}: {cl['throughput_per_s']} infer/s, avg {cl['avg_ms']} ms, "
                      f"p50 {cl['p50_ms']} ms, p99 {cl['p99_ms']} ms; audit: {r['audit']['served']} served once, "
                      f"{r['audit']['refused']} refused", flush=True)
                results.append(r)
    report = {"tool": "perf_analyzer (tritonclient 2.50.0)", "protocol": "http", "through": "gateway",
              "hardware": args.hardware, "photo": args.photo, "levels": results}
    (args.out / "perf_analyzer.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "perf_analyzer.md").write_text(markdown(results, args.hardware))
    print(markdown(results, args.hardware))
    print(f"perf-analyzer: wrote {args.out / 'perf_analyzer.json'}, perf_analyzer.md and c<C>.csv", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
