"""`python -m rtinfer.launch.edge_cloud` (`make serve-edge-cloud`): an edge and a cloud Triton on loopback, to try
the cascade.

The cloud serves ``cascade`` as big-only (threshold above 1) with gRPC over TLS (a throwaway
loopback CA, ``rtinfer.access.loopback_certs``) behind an inference key; its keyring holds the
edge's own service key. The edge serves ``cascade`` with the default threshold and escalates to
the cloud (``cloud_url``): the image is re-sealed with the service key, the answer comes back sealed.
Stop the cloud (its pid is printed) to see ``edge_fallback`` in the edge's audit (the edge keeps
answering). Ctrl-C stops both.
"""
from __future__ import annotations

import argparse
import secrets
import shutil
import signal
import threading
from pathlib import Path

from rtinfer import access, keyring
from rtinfer.launch.process import free_port
from rtinfer.launch.server import ROOT, TritonServer, repository_with

SERVICE_KEY_ID = "edge-svc"
EDGE_CLIENT_ID = "edge-node"  # the only client id the service key may claim at the cloud


def prepare(work: Path) -> dict:
    """Certificates, the service keyring and the cloud's inference key (0600), and both repositories."""
    work.mkdir(parents=True, exist_ok=True)
    certs = access.loopback_certs(work / "tls")
    ring = work / "service-keyring.json"
    if not ring.exists():
        keyring.write_new(ring, key_ids=(SERVICE_KEY_ID,), clients={SERVICE_KEY_ID: [EDGE_CLIENT_ID]})
    api_key_file = work / "cloud-api-key"
    if not api_key_file.exists():
        api_key_file.touch(0o600)
        api_key_file.write_text(secrets.token_hex(16) + "\n")
    ports = {"grpc_port": free_port(), "http_port": free_port(), "metrics_port": free_port()}
    for old in ("cloud-repo", "edge-repo"):  # made afresh: the ports change every run
        shutil.rmtree(work / old, ignore_errors=True)
    cloud_repo = repository_with(work / "cloud-repo", {"cascade": {"threshold": "1.01"}})
    edge_repo = repository_with(work / "edge-repo", {"cascade": {
        "cloud_url": f"127.0.0.1:{ports['grpc_port']}", "cloud_pipeline": "cascade", "cloud_keyring": str(ring),
        "cloud_key_id": SERVICE_KEY_ID, "cloud_client_id": EDGE_CLIENT_ID, "cloud_api_key_file": str(api_key_file),
        "cloud_tls_ca": str(certs["ca"])}})
    return {"certs": certs, "ring": ring, "api_key": api_key_file.read_text().strip(), "ports": ports,
            "cloud_repo": cloud_repo, "edge_repo": edge_repo}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rtinfer.launch.edge_cloud", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keyring", default=str(ROOT / "build" / "keys" / "keyring.json"), help="clients' keyring (edge)")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "edge-cloud")
    p.add_argument("--edge-grpc-port", type=int, default=8001)
    p.add_argument("--edge-http-port", type=int, default=8000)
    args = p.parse_args(argv)
    s = prepare(args.work)
    cloud = TritonServer(s["cloud_repo"], models=("cascade", "classifier_onnx", "classifier_big"),
                         keyring=str(s["ring"]), audit_dir=str(args.work / "audit-cloud"), api_key=s["api_key"],
                         tls_cert=str(s["certs"]["server"]), tls_key=str(s["certs"]["server-key"]),
                         workdir=args.work / "triton-cloud", **s["ports"])
    edge = TritonServer(s["edge_repo"], models=("cascade", "classifier_onnx"), keyring=args.keyring,
                        audit_dir=str(args.work / "audit-edge"), grpc_port=args.edge_grpc_port,
                        http_port=args.edge_http_port, workdir=args.work / "triton-edge")
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with cloud, edge:
        print(f"cloud: gRPC+TLS 127.0.0.1:{s['ports']['grpc_port']} (pid {cloud.proc.pid}), "
              f"audit {args.work / 'audit-cloud'}")
        print(f"edge:  gRPC {edge.grpc_url}, HTTP {edge.http_url}, audit {args.work / 'audit-edge'}")
        print(f"try:   python -m clients.classify build/samples/chelsea.jpg --url {edge.grpc_url} --pipeline cascade "
              f"--keyring {args.keyring}")
        print("       then `kill <cloud pid>`: the edge answers alone (edge_fallback in its audit)")
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
