"""`python -m clients.evaluate`: top-1/top-5 of the served pipeline, end to end, on labeled photos.

Each photo is sealed and sent as a client would (gRPC or HTTP), so the figure includes the
envelope, the server's decoding and crop, the installed classifier and the classification
extension. With ``--reference MODEL.onnx`` the same photos also go through that model in
this process under the model card's transform, side by side, and the gap is reported.
Without ``--url`` it starts its own server on free loopback ports and stops it.

    python -m clients.evaluate --data ../shared/imagenet-sample-dev --split confirm \\
        --reference build/engines/source/model.onnx
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from clients.classify import DEFAULT_PORTS, PipelineClient
from rtinfer import imaging, keyring, labeled_photos

CLIENT_ID = "evaluate"  # sealed with the newest key that may claim it (rtinfer.keyring: clients)

def served(url: str, protocol: str, key: bytes, key_id: str, pipeline: str, files: list[Path],
           concurrency: int) -> list:
    """Top-5 class indices per photo through the server (None where the request failed)."""
    async def run():
        client = PipelineClient(url, protocol=protocol, key=key, key_id=key_id, client_id=CLIENT_ID,
                                pipeline=pipeline, aio=True)
        try:
            return await client.classify_many([f.read_bytes() for f in files], top_k=5, concurrency=concurrency)
        finally:
            await client.close()
    results = asyncio.run(run())
    return [None if isinstance(r, Exception) else [p.index for p in r.predictions] for r in results]


def reference(model: Path, files: list[Path], size: int = imaging.SIZE) -> np.ndarray:
    """Logits of a local ONNX model under the model card's transform (rtinfer.imaging, center crop at ``size``)."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = np.stack([imaging.preprocess(f.read_bytes(), crop="center", size=size) for f in files])
    if sess.get_inputs()[0].type != "tensor(uint8)":
        x = imaging.normalize(x)
    return np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 16]})[0] for i in range(0, len(x), 16)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="labeled photos (<wnid>_*.JPEG or <wnid>/*.JPEG)")
    p.add_argument("--split", choices=labeled_photos.SPLITS, default="confirm")
    p.add_argument("--url", help="a running server (default: start one on free loopback ports)")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    p.add_argument("--keyring", default="build/keys/keyring.json", help="its newest active key seals the photos")
    p.add_argument("--pipeline", default="pipeline")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--reference", type=Path, help="ONNX model to score side by side (e.g. the original FP32)")
    p.add_argument("--out", type=Path, default=Path("build/accuracy/served.json"))
    args = p.parse_args(argv)
    files, labels = labeled_photos.find(args.data)
    if labels is None:
        raise SystemExit(f"{args.data}: images must be named by ImageNet wnid to be scored")
    files, labels = labeled_photos.select(files, labels, args.split)
    with ExitStack() as stack:
        url, ring_path = args.url, Path(args.keyring)
        if url is None:
            from rtinfer.launch.server import TritonServer
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rtinfer-eval-")))
            if not ring_path.exists():
                ring_path = keyring.write_new(work / "keyring.json")
            srv = stack.enter_context(TritonServer(keyring=str(ring_path), audit_dir=str(work / "audit"),
                                                   workdir=work / "triton"))
            url = srv.grpc_url if args.protocol == "grpc" else srv.http_url
        ring = keyring.Keyring.load(ring_path)
        key_id = ring.sealing_key_id(CLIENT_ID)
        t0 = time.perf_counter()
        top5 = served(url or f"127.0.0.1:{DEFAULT_PORTS[args.protocol]}", args.protocol, ring.key(key_id), key_id,
                      args.pipeline, files, args.concurrency)
        elapsed = time.perf_counter() - t0
    failed = sum(t is None for t in top5)
    ranked = np.array([t if t is not None else [-1] * 5 for t in top5], dtype=np.int64)
    out = {"data": str(args.data), "split": args.split, "pipeline": args.pipeline, "protocol": args.protocol,
           "failed_requests": failed, "seconds": round(elapsed, 1), "served": labeled_photos.accuracy(ranked, labels)}
    print(f"[evaluate] served pipeline, {len(files)} photos ({args.split}): top-1 {out['served']['top1_accuracy']:.2%} "
          f"[{out['served']['top1_ci95'][0]:.1%}, {out['served']['top1_ci95'][1]:.1%}], top-5 "
          f"{out['served']['top5_accuracy']:.2%}, {failed} failed, {elapsed:.0f} s", flush=True)
    if args.reference:
        logits = reference(args.reference, files)
        out["reference"] = {"model": str(args.reference), **labeled_photos.accuracy(logits, labels)}
        out["gap_points"] = 100 * (out["served"]["top1_accuracy"] - out["reference"]["top1_accuracy"])
        out["agreement_with_reference"] = float(np.mean(ranked[:, 0] == logits.argmax(1)))
        print(f"[evaluate] reference {args.reference}: top-1 {out['reference']['top1_accuracy']:.2%}; "
              f"served - reference = {out['gap_points']:+.1f} points, top-1 agreement "
              f"{out['agreement_with_reference']:.2%}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
