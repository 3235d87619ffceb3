"""Client library and CLI for the encrypted pipeline, over gRPC or HTTP (tritonclient).

    python -m clients.classify IMAGE... --protocol grpc --url 127.0.0.1:8001 --key-id k1 --top-k 5

Each image is sealed with rtinfer.envelope (the code the server opens it with),
sent with a request id and the client id as a request parameter, and the top-k
comes from Triton's classification extension (class_count on PROBS), or, with
--seal-response, sealed back to the same key (private through TLS-terminating proxies):
the request for a sealed answer is inside the authenticated envelope header, so nobody on
the way can drop it, and a clear answer to it is refused here.
Access: --api-key-file (or $RTINFER_API_KEY) for servers that require an inference
key; --tls-ca (+ --tls-cert/--tls-key for mutual TLS) for TLS (gRPC, or HTTP through the gateway).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtinfer import access, envelope
from rtinfer.keyring import DEFAULT_KEY_ID, Keyring

DEFAULT_PORTS = {"grpc": 8001, "http": 8000}


@dataclass
class Prediction:
    score: float
    index: int
    label: str


@dataclass
class Result:
    request_id: str
    predictions: list[Prediction]
    audit_ref: str  # hash of the audit record the server wrote for this request


def _module(protocol: str, aio: bool = False):
    if protocol == "grpc":
        import tritonclient.grpc as m
        import tritonclient.grpc.aio as a
    elif protocol == "http":
        import tritonclient.http as m
        import tritonclient.http.aio as a
    else:
        raise ValueError(f"protocol must be grpc or http, not {protocol!r}")
    return a if aio else m


def parse_classes(raw: np.ndarray) -> list[Prediction]:
    """Triton's classification output: b"score:index:label" per class, best first."""
    out = []
    for item in raw.reshape(-1):
        score, index, label = (item.decode() if isinstance(item, bytes) else item).split(":", 2)
        out.append(Prediction(float(score), int(index), label))
    return out


class PipelineClient:
    """Seals images and calls the pipeline; one instance per server and identity."""

    def __init__(self, url: str, *, protocol: str = "grpc", key: bytes, key_id: str = DEFAULT_KEY_ID,
                 client_id: str = "cli", pipeline: str = "pipeline", headers: dict | None = None,
                 aio: bool = False, api_key: str = "", tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, seal_response: bool = False, **client_kwargs):
        self.protocol, self.pipeline = protocol, pipeline
        self.key, self.key_id, self.client_id = key, key_id, client_id
        self.seal_response = seal_response
        self._sent = weakref.WeakKeyDictionary()  # InferInput -> the envelope it carries
        self.headers = {**access.headers(protocol, api_key), **(headers or {})}
        self._m = _module(protocol, aio)
        if protocol == "grpc":
            client_kwargs = {**access.grpc_tls_kwargs(tls_ca, tls_cert, tls_key), **client_kwargs}
        else:  # HTTPS: through the gateway (Triton's own HTTP endpoint has no TLS)
            client_kwargs = {**access.http_tls_kwargs(tls_ca, tls_cert, tls_key, aio=aio), **client_kwargs}
        self.client = self._m.InferenceServerClient(url=url, **client_kwargs)

    def seal(self, image: bytes, seal_response: bool | None = None) -> bytes:
        return envelope.seal(image, self.key, key_id=self.key_id, client_id=self.client_id, pipeline=self.pipeline,
                             seal_response=self.seal_response if seal_response is None else seal_response)

    @staticmethod
    def wants_sealed(sealed: bytes) -> bool:
        """Whether this envelope's authenticated header asks for a sealed answer (what the server honours)."""
        try:
            return envelope.parse_header(sealed)[0].seal_response
        except envelope.Refusal:
            return False

    def request(self, sealed: bytes, top_k: int, request_id: str | None = None) -> dict:
        """The keyword arguments of one infer() call (shared by the sync and async clients)."""
        inp = self._m.InferInput("ENVELOPE", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[sealed]], dtype=np.object_))
        self._sent[inp] = sealed  # a sealed reply must answer exactly this envelope
        params = {"client_id": self.client_id}
        if self.wants_sealed(sealed):  # the answer comes back inside AUDIT_REF, sealed; PROBS would be zeros
            params.update(top_k=top_k)
            outputs = [self._m.InferRequestedOutput("AUDIT_REF")]
        else:
            outputs = [self._m.InferRequestedOutput("PROBS", class_count=top_k),
                       self._m.InferRequestedOutput("AUDIT_REF")]
        return dict(model_name=self.pipeline, inputs=[inp], outputs=outputs,
                    request_id=request_id or uuid.uuid4().hex, parameters=params, headers=self.headers)

    def result(self, kwargs: dict, response) -> Result:
        ref = response.as_numpy("AUDIT_REF").reshape(-1)[0]
        request_envelope = self._sent[kwargs["inputs"][0]]
        if self.wants_sealed(request_envelope):
            sealed = ref if isinstance(ref, bytes) else str(ref).encode()
            if not sealed.startswith(envelope.MAGIC):
                raise envelope.Refusal("clear_response", "a sealed answer was asked for, but the answer "
                                               "came in clear: refused (downgraded on the way, or an old server)")
            body = json.loads(envelope.open_response(sealed, self.key, request_envelope).plaintext)
            if body["request_id"] != kwargs["request_id"]:
                raise ValueError("sealed response answers another request id")
            predictions = [Prediction(float(s), int(i), lbl) for s, i, lbl in body["predictions"]]
            return Result(kwargs["request_id"], predictions, body["audit_ref"])
        return Result(kwargs["request_id"], parse_classes(response.as_numpy("PROBS")),
                      ref.decode() if isinstance(ref, bytes) else str(ref))

    def infer_envelope(self, sealed: bytes, *, top_k: int = 5, request_id: str | None = None) -> Result:
        kwargs = self.request(sealed, top_k, request_id)
        return self.result(kwargs, self.client.infer(**kwargs))

    def classify(self, image: bytes, *, top_k: int = 5, request_id: str | None = None) -> Result:
        return self.infer_envelope(self.seal(image), top_k=top_k, request_id=request_id)

    async def classify_async(self, image: bytes, *, top_k: int = 5, request_id: str | None = None) -> Result:
        kwargs = self.request(self.seal(image), top_k, request_id)
        return self.result(kwargs, await self.client.infer(**kwargs))

    async def classify_many(self, images: list[bytes], *, top_k: int = 5, concurrency: int = 8) -> list:
        """Many images at once (needs aio=True); a failed request yields its exception in place."""
        gate = asyncio.Semaphore(concurrency)

        async def one(img):
            async with gate:
                return await self.classify_async(img, top_k=top_k)
        return await asyncio.gather(*(one(i) for i in images), return_exceptions=True)

    def close(self):
        result = self.client.close()
        if asyncio.iscoroutine(result):
            return result


def add_access_args(p: argparse.ArgumentParser) -> None:
    """--api-key-file and gRPC TLS options (shared with other tools that call the server)."""
    p.add_argument("--api-key-file", help=f"file holding the inference API key (or ${access.API_KEY_ENV})")
    p.add_argument("--tls-ca", help="TLS (gRPC; HTTP through the gateway): CA certificate (PEM) that signed "
                   "the server's certificate")
    p.add_argument("--tls-cert", help="mutual TLS: client certificate (PEM)")
    p.add_argument("--tls-key", help="mutual TLS: client private key (PEM)")


def access_kwargs(args) -> dict:
    return dict(api_key=access.read_secret(file=args.api_key_file, env=access.API_KEY_ENV),
                tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.classify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    p.add_argument("--url", help="host:port (default 127.0.0.1:8001 for gRPC, :8000 for HTTP)")
    p.add_argument("--keyring", default="build/keys/keyring.json")
    p.add_argument("--key-id", help="default: the keyring's newest active key that may claim --client-id")
    p.add_argument("--client-id", default="cli")
    p.add_argument("--pipeline", default="pipeline")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=1, help=">1: send the images concurrently (asyncio)")
    p.add_argument("--seal-response", action="store_true", help="ask for the result sealed to the same key")
    add_access_args(p)
    args = p.parse_args(argv)
    url = args.url or f"127.0.0.1:{DEFAULT_PORTS[args.protocol]}"
    ring = Keyring.load(args.keyring)
    key_id = args.key_id or ring.sealing_key_id(args.client_id)
    kw = dict(protocol=args.protocol, key=ring.key(key_id), key_id=key_id, client_id=args.client_id,
              pipeline=args.pipeline, seal_response=args.seal_response, **access_kwargs(args))
    images = [path.read_bytes() for path in args.images]
    if args.concurrency > 1:
        async def run():
            client = PipelineClient(url, aio=True, **kw)
            try:
                return await client.classify_many(images, top_k=args.top_k, concurrency=args.concurrency)
            finally:
                await client.close()
        results = asyncio.run(run())
    else:
        client = PipelineClient(url, **kw)
        results = []
        for img in images:
            try:
                results.append(client.classify(img, top_k=args.top_k))
            except Exception as exc:  # noqa: BLE001 - one bad image must not hide the others' results
                results.append(exc)
        client.close()
    status = 0
    for path, res in zip(args.images, results):
        if isinstance(res, Exception):
            status = 1
            print(f"{path}: ERROR {res}")
            continue
        print(f"{path}: request {res.request_id}, audit record {res.audit_ref[:16]}")
        for pred in res.predictions:
            print(f"  {pred.score:7.4f}  {pred.index:4d}  {pred.label}")
    return status


if __name__ == "__main__":
    sys.exit(main())
