"""What the gateway adds to one client's latency: the pipeline through HAProxy vs straight to Triton.

    python -m loadtest.gateway_overhead [--requests 300] [--out build/bench]

One Triton on free loopback ports and one gateway in front of it. One client per path and
protocol sends one request at a time; the paths alternate request by request (direct,
gateway, direct, ...), so background load drifts over both alike. Envelopes are sealed
before the clock starts: only the call is timed. Writes gateway_overhead.json under --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from clients import samples
from clients.classify import PipelineClient
from loadtest import target
from rtinfer.keyring import Keyring
from rtinfer.launch.gateway import Gateway
from rtinfer.launch.server import ROOT, TritonServer


def timed_calls(clients: dict[str, PipelineClient], image: bytes, n: int) -> dict[str, list[float]]:
    """n calls per client, interleaved; milliseconds per call (the first of each client is a warm-up)."""
    times = {name: [] for name in clients}
    order = list(clients)
    for i in range(n + 1):
        for name in (order if i % 2 else order[::-1]):
            c = clients[name]
            kwargs = c.request(c.seal(image), 1)
            start = time.perf_counter()
            c.result(kwargs, c.client.infer(**kwargs))
            if i:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def summary(ms: list[float]) -> dict:
    a = np.array(ms)
    return {"n": len(a), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p90_ms": round(float(np.percentile(a, 90)), 2), "mean_ms": round(float(a.mean()), 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.gateway_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300, help="timed requests per path and protocol")
    p.add_argument("--keyring", type=Path, default=ROOT / "build" / "keys" / "keyring.json")
    p.add_argument("--key-id", default="k1")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "bench")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    target.ensure_keyring(args.keyring)
    key = Keyring.load(args.keyring).key(args.key_id)
    image = samples.photo("coffee")
    report = {"requests": args.requests, "image": "coffee", "protocols": {}}
    with TritonServer(keyring=str(args.keyring), audit_dir=str(args.out / "gateway-audit"),
                      workdir=args.out / "triton") as server, \
            Gateway.in_front_of(server, workdir=args.out) as gateway:
        for protocol in ("grpc", "http"):
            clients = {name: PipelineClient(getattr(where, f"{protocol}_url"), protocol=protocol, key=key,
                                            key_id=args.key_id, client_id="gateway-overhead")
                       for name, where in (("direct", server), ("gateway", gateway))}
            times = timed_calls(clients, image, args.requests)
            for c in clients.values():
                c.close()
            row = {name: summary(ms) for name, ms in times.items()}
            row["added_p50_ms"] = round(row["gateway"]["p50_ms"] - row["direct"]["p50_ms"], 2)
            report["protocols"][protocol] = row
            print(f"{protocol}: direct p50 {row['direct']['p50_ms']} ms, through the gateway "
                  f"p50 {row['gateway']['p50_ms']} ms: +{row['added_p50_ms']} ms", flush=True)
    (args.out / "gateway_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
