"""`make loadtest`: headless Locust against the pipeline, per-stage breakdown, SLO check.

    python -m loadtest.run [--users 8 --spawn-rate 4 --duration 60s] [--step] [--slo loadtest/slo.toml]
                           [--grpc H:P --http H:P --metrics URL]   # else: our own server on free ports

Writes under --out (build/loadtest): Locust's CSV files and HTML report, breakdown.json/.md
(Triton's metrics diffed around the run), breakdown.png, summary.md; with --step also the
per-step table and the knee. Exits 1 when an SLO fails, naming it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from loadtest import metrics, plots, slo, target
from rtinfer.launch.server import ROOT

HERE = Path(__file__).resolve().parent


def locust_command(args, tgt: target.Target, prefix: Path) -> list[str]:
    files = str(HERE / "locustfile.py") + ("," + str(HERE / "stepload.py") if args.step else "")
    cmd = [sys.executable, "-m", "locust", "-f", files, "--headless", "--csv", str(prefix), "--csv-full-history",
           "--html", str(prefix.parent / "report.html"), "--stop-timeout", "10",
           "--triton-grpc", tgt.grpc, "--triton-http", tgt.http, "--keyring", str(args.keyring),
           "--pipeline", args.pipeline, "--top-k", str(args.top_k), "--key-id", args.key_id,
           "--wait-min", str(args.wait_min), "--wait-max", str(args.wait_max)]
    if args.step:  # the SLO then covers the whole rise; the per-step table is what finds the knee
        cmd += ["--step-users", str(args.step_users), "--step-time", str(args.step_time),
                "--step-max-users", str(args.step_max_users)]
    else:  # --reset-stats: percentiles without the ramp-up
        cmd += ["-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.duration, "--reset-stats"]
    return cmd + [c for c in args.user_classes.split(",") if c]


def knee(steps: list[dict], p99_slo: float) -> dict | None:
    """The step with the highest throughput whose p99 is within the SLO and that had no errors."""
    ok = [s for s in steps if s["p99_ms"] <= p99_slo and s["errors"] == 0]
    return max(ok, key=lambda s: s["throughput"]) if ok else None


def steps_markdown(steps: list[dict], best: dict | None, p99_slo: float) -> str:
    lines = ["| users | requests | errors | req/s | p50 ms | p95 ms | p99 ms |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for s in steps:
        mark = " **knee**" if best is s else ""
        lines.append(f"| {s['users']}{mark} | {s['requests']} | {s['errors']} | {s['throughput']:.1f} | "
                     f"{s['p50_ms']:.0f} | {s['p95_ms']:.0f} | {s['p99_ms']:.0f} |")
    verdict = (f"Knee: {best['throughput']:.1f} req/s at {best['users']} users (p99 {best['p99_ms']:.0f} ms "
               f"<= SLO {p99_slo:.0f} ms)." if best else f"No step kept p99 within the SLO ({p99_slo:.0f} ms).")
    return "\n".join(lines + ["", verdict])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "build" / "loadtest")
    p.add_argument("--keyring", type=Path, default=ROOT / "build" / "keys" / "keyring.json")
    p.add_argument("--key-id", default="k1")
    p.add_argument("--pipeline", default="pipeline")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--grpc", default="", help="target host:port (with --http and --metrics); else start a server")
    p.add_argument("--http", default="")
    p.add_argument("--metrics", default="", help="Triton metrics URL, http://host:port/metrics")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--spawn-rate", type=float, default=4)
    p.add_argument("--duration", default="60s")
    p.add_argument("--wait-min", type=float, default=0.0)
    p.add_argument("--wait-max", type=float, default=0.0)
    p.add_argument("--user-classes", default="GrpcPipelineUser,HttpPipelineUser")
    p.add_argument("--slo", type=Path, default=HERE / "slo.toml")
    p.add_argument("--step", action="store_true", help="step load (rising users) to find the knee")
    p.add_argument("--step-users", type=int, default=2)
    p.add_argument("--step-time", type=float, default=12.0)
    p.add_argument("--step-max-users", type=int, default=16)
    args = p.parse_args(argv)
    thresholds = slo.load(args.slo)  # fail early on a bad SLO file
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / "locust"
    for old in args.out.glob("locust_*"):
        old.unlink()
    target.ensure_keyring(args.keyring)
    with target.serve(args.out, args.keyring, grpc=args.grpc, http=args.http, metrics=args.metrics) as tgt:
        before = metrics.scrape(tgt.metrics)
        cmd = locust_command(args, tgt, prefix)
        print("running:", " ".join(cmd[2:]), flush=True)
        started = time.monotonic()
        rc = subprocess.call(cmd, cwd=ROOT)  # Locust prints its stats table every few seconds (progress)
        wall = time.monotonic() - started
        after = metrics.scrape(tgt.metrics)
    stats_csv = Path(f"{prefix}_stats.csv")
    if not stats_csv.exists():
        print(f"Locust exited with {rc} and wrote no stats", file=sys.stderr)
        return 2
    stages = metrics.breakdown(before, after)
    (args.out / "breakdown.json").write_text(json.dumps([s.row() for s in stages], indent=1))
    table = metrics.markdown(stages)
    (args.out / "breakdown.md").write_text(table + "\n")
    plots.breakdown(stages, Path(f"{prefix}_stats_history.csv"), args.out / "breakdown.png",
                    f"{args.pipeline}: {'step load' if args.step else f'{args.users} users'}, {wall:.0f} s, "
                    f"target gRPC {tgt.grpc} / HTTP {tgt.http}", ensembles=(args.pipeline,))
    verdicts = slo.check(stats_csv, thresholds)
    summary = ["# Load test", "", f"Locust: `{' '.join(cmd[3:])}`", "", "## Per-stage breakdown (server side)", "",
               "Triton's counts include the ramp-up; with a fixed user count Locust's percentiles start after it "
               "(--reset-stats).", "",
               table, "", "## SLO", "", *[f"- {v}" for v in verdicts]]
    if args.step:
        steps = json.loads(Path(f"{prefix}_steps.json").read_text())
        best = knee(steps, thresholds.get("p99_ms", float("inf")))
        summary += ["", "## Step load", "", steps_markdown(steps, best, thresholds.get("p99_ms", float("inf")))]
    (args.out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n" + "\n".join(summary[4:]))
    print(f"\nreports: {args.out}/summary.md, report.html, breakdown.png, locust_*.csv")
    return slo.report(verdicts, args.slo)


if __name__ == "__main__":
    sys.exit(main())
