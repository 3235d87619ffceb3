"""What the fleet costs (issue 21, section 6; docs/scaling.md "Measured"), in one run.

    python -m loadtest.fleet_bench [--requests 300] [--seconds 15] [--rounds 2] [--clients 8]
                                   [--out build/bench-fleet]

1. One client's latency with the Redis replay store against SQLite: two Triton servers on loopback
   (the same pipeline; one with ``replay_store`` = a real redis-server on loopback, one with the
   default SQLite file), one gRPC client each, requests interleaved one by one (sqlite, redis,
   redis, sqlite, ...) so background load drifts over both alike. Envelopes are sealed before the
   clock starts. Also each server's own ``rtinfer_replay_check_seconds`` (the store's transaction per
   batch, as preprocess measures it).
2. Saturated throughput through the gateway with 1 replica (SQLite, what ``make serve`` runs) and with
   2 replicas (``make serve REPLICAS=2``: Redis), both fleets up at once, closed-loop load from
   ``--clients`` gRPC clients in alternating rounds (1, 2, 2, 1, ...). Per round: throughput, p50/p99,
   errors, the load generator's CPU, and Triton's queue time per request over the replicas
   (``nv_inference_queue_duration_us`` / ``nv_inference_request_success``, every model of the
   pipeline), the figure the autoscaling rule uses.

Writes bench-fleet.json, bench-fleet.md (the table docs/scaling.md quotes) and bench-fleet.png under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
import urllib.request
from pathlib import Path

import numpy as np

from clients import samples
from clients.classify import PipelineClient
from loadtest import loadgen, target
from loadtest.gateway_overhead import summary, timed_calls
from rtinfer.keyring import Keyring
from rtinfer.launch.fleet import Fleet
from rtinfer.launch.redis_server import RedisServer
from rtinfer.launch.server import ROOT, TritonServer

PIPELINE_MODELS = ("pipeline", "preprocess", "classifier_onnx", "postprocess")


def log(msg: str) -> None:
    print(f"bench-fleet: {msg}", flush=True)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def sample_sum(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def queue_totals(servers) -> dict[str, float]:
    """Summed over replicas: queue microseconds over the pipeline's models, and pipeline successes."""
    out = {"queue_us": 0.0, "success": 0.0}
    for s in servers:
        text = scrape(s.metrics_url)
        out["queue_us"] += sum(sample_sum(text, "nv_inference_queue_duration_us", model=m) for m in PIPELINE_MODELS
                               if m != "pipeline")
        out["success"] += sample_sum(text, "nv_inference_request_success", model="pipeline")
    return out


def replay_check(server) -> dict:
    """The stages' own measure of the store (``rtinfer_replay_check_seconds``): ms per batch, preprocess
    (window + envelope nonce) and postprocess (audit-context MAC)."""
    text, out = scrape(server.metrics_url), {}
    for stage in ("preprocess", "postprocess"):
        total = sample_sum(text, "rtinfer_replay_check_seconds_sum", stage=stage)
        count = sample_sum(text, "rtinfer_replay_check_seconds_count", stage=stage)
        out[stage] = {"batches": int(count), "mean_ms": round(total / count * 1e3, 3) if count else None}
    return out


def host() -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    return {"cpus": os.cpu_count(), "cpu": model, "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version()}


def one_client(args, key, out: Path) -> dict:
    log(f"part 1: one client, Redis vs SQLite replay store, {args.requests} requests each, interleaved")
    image = samples.photo("coffee")
    with RedisServer(out / "redis") as redis, \
            TritonServer(keyring=str(args.keyring), audit_dir=str(out / "audit-sqlite"),
                         workdir=out / "triton-sqlite") as sqlite_srv, \
            TritonServer(keyring=str(args.keyring), audit_dir=str(out / "audit-redis"), env=redis.env,
                         workdir=out / "triton-redis") as redis_srv:
        clients = {name: PipelineClient(srv.grpc_url, key=key, key_id=args.key_id, client_id="bench-fleet")
                   for name, srv in (("sqlite", sqlite_srv), ("redis", redis_srv))}
        times = timed_calls(clients, image, args.requests)
        for c in clients.values():
            c.close()
        row = {name: summary(ms) for name, ms in times.items()}
        for name, srv in (("sqlite", sqlite_srv), ("redis", redis_srv)):
            row[name]["replay_check"] = replay_check(srv)
    row["added_p50_ms"] = round(row["redis"]["p50_ms"] - row["sqlite"]["p50_ms"], 2)
    diffs = np.array(times["redis"]) - np.array(times["sqlite"])  # pairs sent back to back
    row["paired_median_diff_ms"] = round(float(np.median(diffs)), 2)
    log(f"  p50 sqlite {row['sqlite']['p50_ms']} ms, redis {row['redis']['p50_ms']} ms: {row['added_p50_ms']:+} ms "
        f"(median of paired differences {row['paired_median_diff_ms']:+} ms); store per batch (pre, post): "
        + ", ".join(f"{n} {row[n]['replay_check']['preprocess']['mean_ms']}, "
                    f"{row[n]['replay_check']['postprocess']['mean_ms']} ms" for n in ("sqlite", "redis")))
    return row


def saturated(args, key, out: Path) -> dict:
    log(f"part 2: saturated throughput through the gateway, 1 vs 2 replicas, {args.clients} gRPC clients, "
        f"{args.rounds} rounds of {args.seconds:.0f} s each")
    image = samples.photo("coffee")
    common = dict(keyring=str(args.keyring), models=("pipeline",), progress=lambda m: log("  " + m))
    with Fleet(1, audit_root=out / "audit-1", workdir=out / "fleet-1", **common) as one, \
            Fleet(2, audit_root=out / "audit-2", workdir=out / "fleet-2", **common) as two:
        fleets = {"1 replica (SQLite)": one, "2 replicas (Redis)": two}
        rounds = []
        for r in range(args.rounds):
            order = list(fleets) if r % 2 == 0 else list(fleets)[::-1]
            for name in order:
                fleet = fleets[name]

                def make_call(worker: int, url=fleet.gateway.grpc_url):
                    c = PipelineClient(url, key=key, key_id=args.key_id, client_id="bench-fleet")
                    return lambda: (c.classify(image, top_k=1), 1)[1]

                q0, cpu0 = queue_totals(fleet.servers), time.process_time()
                level = loadgen.run(make_call, args.clients, warmup=2.0, seconds=args.seconds)
                q1, cpu = queue_totals(fleet.servers), time.process_time() - cpu0
                served = q1["success"] - q0["success"]
                row = {"fleet": name, "round": r + 1, "throughput": level.throughput, "p50_ms": level.p50_ms,
                       "p99_ms": level.p99_ms, "requests": level.requests, "errors": level.errors,
                       "first_error": level.first_error,
                       "queue_us_per_request": round((q1["queue_us"] - q0["queue_us"]) / served, 1) if served else None,
                       "generator_cpu_s_per_s": round(cpu / (args.seconds + 2.0), 2),
                       "load_avg": round(os.getloadavg()[0], 2)}
                rounds.append(row)
                log(f"  round {r + 1} {name}: {row['throughput']} req/s, p50 {row['p50_ms']} ms, "
                    f"p99 {row['p99_ms']} ms, "
                    f"errors {row['errors']}, queue {row['queue_us_per_request']} us/request, "
                    f"generator CPU {row['generator_cpu_s_per_s']} cores")
    per = {}
    for name in fleets:
        rows = [x for x in rounds if x["fleet"] == name]
        per[name] = {"throughput_mean": round(float(np.mean([x["throughput"] for x in rows])), 2),
                     "throughput_rounds": [x["throughput"] for x in rows],
                     "p50_ms_mean": round(float(np.mean([x["p50_ms"] for x in rows])), 1),
                     "p99_ms_mean": round(float(np.mean([x["p99_ms"] for x in rows])), 1),
                     "queue_us_per_request_mean":
                         round(float(np.mean([x["queue_us_per_request"] or 0 for x in rows])), 1),
                     "errors": sum(x["errors"] for x in rows)}
    names = list(fleets)
    first, second = per[names[0]]["throughput_mean"], per[names[1]]["throughput_mean"]
    ratio = second / first if first else None
    return {"clients": args.clients, "seconds": args.seconds, "rounds": rounds, "per_fleet": per,
            "throughput_ratio_2_over_1": round(ratio, 3) if ratio else None}


def table(report: dict) -> str:
    one, sat = report["one_client"], report["saturated"]
    lines = [f"Host: {report['host']['cpus']} cores ({report['host']['cpu']}), load average "
             f"{report['host']['load_avg_at_start'][0]} at the start; `{report['command']}`", "",
             "| one client, gRPC, direct to Triton | p50 | p90 | store per batch: preprocess (nonce) | "
             "postprocess (audit context) |", "|---|---|---|---|---|"]
    for name in ("sqlite", "redis"):
        r, rc = one[name], one[name]["replay_check"]
        lines.append(f"| {name} replay store | {r['p50_ms']} ms | {r['p90_ms']} ms | "
                     f"{rc['preprocess']['mean_ms']} ms | {rc['postprocess']['mean_ms']} ms |")
    lines += ["", f"Redis adds {one['added_p50_ms']:+} ms to the p50 (median of the paired differences "
              f"{one['paired_median_diff_ms']:+} ms), {report['requests']} requests each, interleaved.", "",
              f"| through the gateway, {sat['clients']} gRPC clients, closed loop | throughput (rounds) | p50 | p99 "
              "| queue time per request | errors |", "|---|---|---|---|---|---|"]
    for name, r in sat["per_fleet"].items():
        lines.append(f"| {name} | {r['throughput_mean']} req/s ({', '.join(map(str, r['throughput_rounds']))}) "
                     f"| {r['p50_ms_mean']} ms | {r['p99_ms_mean']} ms "
                     f"| {r['queue_us_per_request_mean'] / 1000:.1f} ms "
                     f"| {r['errors']} |")
    lines += ["", f"2 replicas / 1 replica throughput: {sat['throughput_ratio_2_over_1']}"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    one, sat = report["one_client"], report["saturated"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["sqlite", "redis"]
    a.bar(names, [one[n]["p50_ms"] for n in names], color=["#888", "#c33"])
    a.set_ylabel("one client's p50 (ms)")
    a.set_title("replay store, one client (interleaved)")
    fleets = list(sat["per_fleet"])
    b.bar(fleets, [sat["per_fleet"][f]["throughput_mean"] for f in fleets], color=["#888", "#36c"])
    for i, f in enumerate(fleets):
        b.scatter([i] * len(sat["per_fleet"][f]["throughput_rounds"]), sat["per_fleet"][f]["throughput_rounds"],
                  color="k", zorder=3, s=12)
    b.set_ylabel("requests/s")
    b.set_title(f"saturated, {sat['clients']} clients, {report['host']['cpus']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.fleet_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300, help="part 1: timed requests per store")
    p.add_argument("--seconds", type=float, default=15.0, help="part 2: measured seconds per round and fleet")
    p.add_argument("--rounds", type=int, default=2, help="part 2: rounds (each fleet once per round)")
    p.add_argument("--clients", type=int, default=8, help="part 2: closed-loop gRPC clients")
    p.add_argument("--keyring", type=Path, default=ROOT / "build" / "keys" / "keyring.json")
    p.add_argument("--key-id", default="k1")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "bench-fleet")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    target.ensure_keyring(args.keyring)
    key = Keyring.load(args.keyring).key(args.key_id)
    report = {"command": "make bench-fleet " + " ".join(
                  f"BENCH_FLEET_{k.upper()}={getattr(args, k):g}"
                  for k in ("requests", "seconds", "rounds", "clients")),
              "host": host(), "requests": args.requests, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    report["one_client"] = one_client(args, key, args.out)
    report["saturated"] = saturated(args, key, args.out)
    (args.out / "bench-fleet.json").write_text(json.dumps(report, indent=2) + "\n")
    md = table(report)
    (args.out / "bench-fleet.md").write_text(md)
    png = plot(report, args.out / "bench-fleet.png")
    print(md, flush=True)
    log(f"wrote {args.out / 'bench-fleet.json'}, bench-fleet.md{', bench-fleet.png' if png else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
