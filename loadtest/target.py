"""The server under test: a given Triton (URLs), or our own embedded tritonserver on free loopback ports."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from rtinfer import keyring
from rtinfer.launch.server import ROOT, TritonServer


@dataclass
class Target:
    grpc: str
    http: str
    metrics: str
    pid: int | None = None  # our own server's process (for CPU accounting), None for a given URL
    gateway_pid: int | None = None  # the gateway in front of it, when we started one
    triton_grpc: str = ""  # our own Triton's loopback ports behind the gateway (breakdown, trace API)
    triton_http: str = ""


def ensure_keyring(path: str | Path) -> Path:
    """The keyring clients seal with; created (owner-only) when missing, as `make keys` does."""
    path = Path(path)
    if not path.exists():
        keyring.write_new(path)
    return path


@contextlib.contextmanager
def serve(out: Path, keyring_path: Path, *, grpc: str = "", http: str = "", metrics: str = "",
          gateway: bool = False, extra_args=()):
    """Yield a Target; start and always stop our own server unless gRPC/HTTP/metrics URLs are all given.
    ``gateway``: put the gateway in front as `make serve` does; the Target's URLs are then the gateway's."""
    if grpc and http and metrics:
        yield Target(grpc, http, metrics)
        return
    if grpc or http or metrics:
        raise ValueError("give all three of the gRPC, HTTP and metrics URLs, or none (then a server is started)")
    if not (ROOT / "model_repository" / "classifier_onnx" / "1" / "model.onnx").exists():
        raise SystemExit("the CPU model is not built: run `make engines`")
    print(f"starting tritonserver (audit in {out / 'audit'}) ...", flush=True)
    with TritonServer(keyring=str(keyring_path), audit_dir=str(out / "audit"), workdir=out / "triton",
                      extra_args=extra_args) as srv:
        print(f"tritonserver ready: gRPC {srv.grpc_url} HTTP {srv.http_url} metrics {srv.metrics_url}", flush=True)
        if not gateway:
            yield Target(srv.grpc_url, srv.http_url, srv.metrics_url, srv.proc.pid,
                         triton_grpc=srv.grpc_url, triton_http=srv.http_url)
            return
        from rtinfer.launch.gateway import Gateway
        with Gateway.in_front_of(server=srv, workdir=out / "gateway") as gw:
            print(f"gateway ready: gRPC {gw.grpc_url} HTTP {gw.http_url}", flush=True)
            yield Target(gw.grpc_url, gw.http_url, srv.metrics_url, srv.proc.pid, gw.proc.pid,
                         triton_grpc=srv.grpc_url, triton_http=srv.http_url)
