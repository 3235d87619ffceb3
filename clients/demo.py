"""`make demo`: start the server, classify the shipped sample photos over gRPC and HTTP, stop."""
from __future__ import annotations

import argparse
import sys

from clients import classify, samples
from rtinfer import audit
from rtinfer.launch.server import TritonServer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.demo")
    p.add_argument("--keyring", default="build/keys/keyring.json")
    p.add_argument("--audit-dir", default="build/audit")
    args = p.parse_args(argv)
    images = samples.write_samples("build/samples", ("chelsea", "coffee"))
    with TritonServer(keyring=args.keyring, audit_dir=args.audit_dir) as server:
        print(f"tritonserver ready (config {server.config_name or 'config.pbtxt'}): "
              f"HTTP {server.http_url}, gRPC {server.grpc_url}", flush=True)
        status = 0
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            print(f"\n== {protocol.upper()} {url}", flush=True)
            status |= classify.main([*map(str, images), "--protocol", protocol, "--url", url,
                                     "--keyring", args.keyring, "--client-id", "demo", "--top-k", "3"])
    print()
    status |= audit.main(["verify", args.audit_dir])
    return status


if __name__ == "__main__":
    sys.exit(main())
