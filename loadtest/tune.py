"""CPU tuning sweep: the pipeline under candidate model configs, side by side, with the per-stage breakdown.

    python -m loadtest.tune [--variants current,intra1,two_x_intra1,...] [--levels 1,4,8]

Each variant is a copy of model_repository/ under build/tune/<variant>/ with a few
config fields replaced (instance count, ONNX Runtime threads, preferred batch sizes,
queue delay); every replacement must match exactly once, so a renamed field fails
loudly instead of measuring the unchanged config. All variants' servers run at once
(idle ones cost no CPU) and are measured level by level in turn, so background load
drifts over all of them alike. Writes tune.json and tune.md under --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from loadtest import cpu, loadgen, metrics, target
from loadtest.bench import MODEL, Arms, model_info
from rtinfer.keyring import Keyring
from rtinfer.launch.server import ROOT, TritonServer

# variant -> model -> {field: value}; "instances", "intra", "preferred" (list), "delay_us"
VARIANTS: dict[str, dict[str, dict]] = {
    "current": {},
    "intra1": {"classifier_onnx": {"intra": 1}},
    "two_x_intra1": {"classifier_onnx": {"instances": 2, "intra": 1}},
    "two_x_intra1_pre2": {"classifier_onnx": {"instances": 2, "intra": 1}, "preprocess": {"instances": 2}},
    "intra2_pre2": {"preprocess": {"instances": 2}},
    "two_x_intra1_nodelay": {"classifier_onnx": {"instances": 2, "intra": 1, "delay_us": 0}},
    # issue 11 candidates: pre/post queue delays, a wide session for a lone request, spinning
    "stage_delay0": {"preprocess": {"delay_us": 0}, "postprocess": {"delay_us": 0}},
    "stage_delay200": {"preprocess": {"delay_us": 200}, "postprocess": {"delay_us": 200}},
    "lone2": {"classifier_onnx": {"params": {"lone_request_thread_count": "2"}}},
    "lone2_nospin": {"classifier_onnx": {"params": {"lone_request_thread_count": "2",
                                                    "lone_request_allow_spinning": "0"}}},
    "lone2_nospin_delay0": {"classifier_onnx": {"params": {"lone_request_thread_count": "2",
                                                           "lone_request_allow_spinning": "0"}},
                            "preprocess": {"delay_us": 0}, "postprocess": {"delay_us": 0}},
    "lone2_spin_stop": {"classifier_onnx": {"params": {"lone_request_thread_count": "2",
                                                       "lone_request_allow_spinning": "1",
                                                       "lone_request_force_spinning_stop": "1"}}},
    "lone0": {"classifier_onnx": {"params": {"lone_request_thread_count": "0"}}},
    "one_x_intra2_nospin": {"classifier_onnx": {"instances": 1, "intra": 2,
                                                "params": {"session.intra_op.allow_spinning": "0"}}},
    "two_x_intra2_nospin": {"classifier_onnx": {"instances": 2, "intra": 2,
                                                "params": {"session.intra_op.allow_spinning": "0"}}},
    "pre2": {"preprocess": {"instances": 2}},
}

_FIELDS = {
    "instances": (r"(instance_group \[ \{ kind: KIND_CPU count: )\d+", lambda v: str(v)),
    "intra": (r'(key: "intra_op_thread_count" value: \{ string_value: ")\d+', lambda v: str(v)),
    "preferred": (r"(preferred_batch_size: )\[[^\]]*\]", lambda v: "[ " + ", ".join(map(str, v)) + " ]"),
    "delay_us": (r"(max_queue_delay_microseconds: )\d+", lambda v: str(v)),
}


def _set_params(text: str, params: dict[str, str]) -> str:
    """Each parameter's value replaced where the config has it, else added to its parameters list."""
    for key, value in params.items():
        entry = f'{{ key: "{key}" value: {{ string_value: "{value}" }} }}'
        text, n = re.subn(r'\{ key: "' + re.escape(key) + r'" value: \{ string_value: "[^"]*" \} \}', entry, text)
        if n == 0:
            text, n = re.subn(r"(parameters \[\n)", lambda m: m.group(1) + f"  {entry},\n", text)
        if n != 1:
            raise ValueError(f"parameter {key} matched {n} times, expected 1")
    return text


def config_file(repo: Path, model: str) -> Path:
    cpu_cfg = repo / model / "configs" / "cpu.pbtxt"
    return cpu_cfg if cpu_cfg.exists() else repo / model / "config.pbtxt"


def apply(repo: Path, overrides: dict[str, dict]) -> None:
    for model, fields in overrides.items():
        path = config_file(repo, model)
        text = path.read_text()
        for name, value in fields.items():
            if name == "params":
                text = _set_params(text, value)
                continue
            pattern, fmt = _FIELDS[name]
            text, n = re.subn(pattern, lambda m: m.group(1) + fmt(value), text)
            if n != 1:
                raise ValueError(f"{path}: field {name} matched {n} times, expected 1")
        path.write_text(text)


def make_repo(out: Path, name: str) -> Path:
    repo = out / name / "model_repository"
    if repo.exists():
        shutil.rmtree(repo)
    shutil.copytree(ROOT / "model_repository", repo, ignore=shutil.ignore_patterns("__pycache__"))
    apply(repo, VARIANTS[name])
    return repo


def one_client(servers: dict[str, TritonServer], key: bytes, n: int) -> dict[str, dict]:
    """One client, one request at a time, round-robin over the variants (and bare ORT decode + inference,
    all cores, in a process of its own as `make bench` runs it: ``loadtest.bare_ort``), so each variant's
    server is idle while another answers and drifting load hits all alike."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    from loadtest.bare_ort import BareOrt
    from loadtest.payloads import Sealer
    bare = BareOrt(str(MODEL), os.cpu_count() or 1, True)
    sealer = Sealer(key, key_id="k1", client_id="tune", pipeline="pipeline", names=("chelsea",))
    clients = {name: grpcclient.InferenceServerClient(srv.grpc_url) for name, srv in servers.items()}

    def call(name):
        """A function that makes one request and returns its milliseconds."""
        if name == "ort_with_decode":
            return lambda: bare.time("decode")  # timed inside the child (the pipe is not counted)
        inp = grpcclient.InferInput("ENVELOPE", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[sealer.next()]], dtype=np.object_))

        def infer():
            t0 = time.perf_counter()
            clients[name].infer("pipeline", [inp], request_id=uuid.uuid4().hex, parameters={"client_id": "tune"})
            return (time.perf_counter() - t0) * 1e3
        return infer
    names = ["ort_with_decode", *servers]
    times = {name: [] for name in names}
    for i in range(n + 10):
        for name in names[i % len(names):] + names[:i % len(names)]:
            ms = call(name)()
            if i >= 10:
                times[name].append(ms)
    for c in clients.values():
        c.close()
    bare.close()
    return {name: {"p50_ms": round(loadgen.percentile(sorted(v), 0.5), 2),
                   "p99_ms": round(loadgen.percentile(sorted(v), 0.99), 2), "n": len(v)} for name, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "build" / "tune")
    p.add_argument("--keyring", type=Path, default=ROOT / "build" / "keys" / "keyring.json")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--levels", default="1,4,8")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--single", type=int, default=0, help="one client: requests per variant, round-robin (0: skip)")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    levels = [int(x) for x in args.levels.split(",") if x]
    target.ensure_keyring(args.keyring)
    key = Keyring.load(args.keyring).key("k1")
    results = {n: {"overrides": VARIANTS[n], "levels": [], "breakdown": {}} for n in names}
    results["ort"] = {"overrides": {}, "levels": []}
    with contextlib.ExitStack() as stack:
        servers = {}
        for n in names:
            repo = make_repo(args.out, n)
            srv = stack.enter_context(TritonServer(repo, keyring=str(args.keyring),
                                                   audit_dir=str(args.out / n / "audit"), workdir=args.out / n))
            servers[n] = srv
            print(f"{n}: ready on gRPC {srv.grpc_url}", flush=True)
        started = time.monotonic()
        if args.single:
            single = one_client(servers, key, args.single)
            results["one_client"] = single
            print(json.dumps(single), flush=True)
        for c in levels:
            for n in ["ort", *names]:
                srv = servers.get(n)
                tgt = target.Target(srv.grpc_url, srv.http_url, srv.metrics_url, srv.proc.pid) if srv else \
                    target.Target("", "", "")
                arms = Arms(tgt, 0, key, "k1", 5, 0)
                make_call, workers = arms.make("ort" if n == "ort" else "pipeline_grpc", c)
                before = metrics.scrape(srv.metrics_url) if srv else None
                with cpu.CpuMeter({"triton": tgt.pid}) as meter:
                    level = loadgen.run(make_call, c, workers=workers, warmup=args.warmup, seconds=args.seconds)
                results[n]["levels"].append(dict(asdict(level), cpu=meter.cores))
                if srv:
                    stages = metrics.breakdown(before, metrics.scrape(srv.metrics_url))
                    results[n]["breakdown"][str(c)] = [s.row() for s in stages]
                print(f"{time.monotonic() - started:5.0f}s c={c:<3} {n:<20} {level.throughput:6.1f} img/s "
                      f"p50 {level.p50_ms:6.1f} p99 {level.p99_ms:6.1f} ms  cores {meter.cores}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results["model"] = model_info()  # which model file was measured (another variant may be installed later)
    (args.out / "tune.json").write_text(json.dumps(results, indent=1))
    last = levels[-1] if levels else 0
    lines = ["| variant | overrides | " + " | ".join(f"c={c} img/s, p50/p99 ms" for c in levels) +
             f" | at c={last}: per stage queue+infer ms (batch) |", "|---|---|" + "---:|" * len(levels) + "---|"]
    for n, r in results.items():
        if n in ("model", "one_client"):
            continue
        cells = [f"{lv['throughput']:.1f}, {lv['p50_ms']:.1f}/{lv['p99_ms']:.1f}" for lv in r["levels"]]
        stages = r.get("breakdown", {}).get(str(last), [])
        per = "; ".join(f"{s['model'].replace('classifier_onnx', 'clf')} {s['queue_ms']:.1f}+{s['infer_ms']:.1f} "
                        f"({s['avg_batch']:.1f})" for s in stages if s["model"] != "pipeline")
        lines.append(f"| {n} | `{json.dumps(r['overrides'])}` | " + " | ".join(cells) + f" | {per} |")
    if "one_client" in results:
        lines.append("\nOne client (round-robin, chelsea): " + ", ".join(
            f"{k} p50 {v['p50_ms']:.2f} / p99 {v['p99_ms']:.2f} ms" for k, v in results["one_client"].items()))
    lines.append(f"\nModel: {json.dumps(results['model'])}")
    (args.out / "tune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
