"""Locust users for the encrypted pipeline over gRPC and HTTP, with tritonclient.

    locust -f loadtest/locustfile.py --headless -u 8 -r 4 -t 30s \
        --triton-grpc 127.0.0.1:8001 --triton-http 127.0.0.1:8000 --keyring build/keys/keyring.json

Against a locked-down server add ``--triton-api-key-file F --triton-tls-ca CA.pem``
(``--triton-tls-cert/--triton-tls-key`` for mutual TLS; Locust's own ``--tls-*`` are for its web UI).
Pick one protocol by naming its user class (``GrpcPipelineUser`` / ``HttpPipelineUser``)
after the options. Every option also reads ``LOCUST_<OPTION>`` from the environment.
Each request seals one of the shipped photos with a fresh nonce and is reported to
Locust's request event as type ``grpc``/``http`` and the pipeline's name; Triton's
error message is the failure. Custom-client style as in Locust's own examples.

gRPC and gevent: grpcio's blocking calls would hold a Locust worker's only OS thread
and every other user with it, so the measured latency would include other users'
requests. ``grpc.experimental.gevent.init_gevent()`` (before any channel exists) makes
grpcio's completion queue cooperate with gevent. HTTP uses tritonclient.http, which
is built on geventhttpclient and is gevent-friendly as is.
"""
from __future__ import annotations

import random
import time
import uuid
import weakref

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from locust import User, events, task
from tritonclient.utils import InferenceServerException

from loadtest.payloads import Sealer
from rtinfer import access
from rtinfer.keyring import Keyring


@events.init_command_line_parser.add_listener
def _options(parser):
    group = parser.add_argument_group("rtinfer pipeline")
    group.add_argument("--triton-grpc", default="127.0.0.1:8001", env_var="LOCUST_TRITON_GRPC",
                       help="Triton gRPC host:port")
    group.add_argument("--triton-http", default="127.0.0.1:8000", env_var="LOCUST_TRITON_HTTP",
                       help="Triton HTTP host:port")
    group.add_argument("--pipeline", default="pipeline", env_var="LOCUST_PIPELINE", help="ensemble to call")
    group.add_argument("--keyring", default="build/keys/keyring.json", env_var="LOCUST_KEYRING")
    group.add_argument("--key-id", default="k1", env_var="LOCUST_KEY_ID")
    group.add_argument("--client-id", default="locust", env_var="LOCUST_CLIENT_ID")
    group.add_argument("--top-k", type=int, default=5, env_var="LOCUST_TOP_K")
    group.add_argument("--wait-min", type=float, default=0.0, env_var="LOCUST_WAIT_MIN",
                       help="seconds between a user's requests, lower bound (0 = closed loop)")
    group.add_argument("--wait-max", type=float, default=0.0, env_var="LOCUST_WAIT_MAX")
    group.add_argument("--triton-api-key-file", default="", env_var="LOCUST_TRITON_API_KEY_FILE",
                       help="file holding the inference API key (server started with --api-key-file)")
    group.add_argument("--triton-tls-ca", default="", env_var="LOCUST_TRITON_TLS_CA",
                       help="gRPC TLS: CA certificate (PEM)")
    group.add_argument("--triton-tls-cert", default="", env_var="LOCUST_TRITON_TLS_CERT",
                       help="gRPC mutual TLS: client cert")
    group.add_argument("--triton-tls-key", default="", env_var="LOCUST_TRITON_TLS_KEY",
                       help="gRPC mutual TLS: client key")


class TritonFailure(Exception):
    """Triton's status and message, as Locust shows failures (it groups them by the exception's repr)."""


class PipelineClient:
    """Calls the pipeline once per ``classify()`` and reports it to Locust's request event."""

    def __init__(self, environment, protocol: str):
        opts = environment.parsed_options
        self.events, self.protocol, self.pipeline, self.top_k = environment.events, protocol, opts.pipeline, opts.top_k
        self.client_id = opts.client_id
        self.sealer = Sealer(Keyring.load(opts.keyring).key(opts.key_id), key_id=opts.key_id,
                             client_id=opts.client_id, pipeline=opts.pipeline, start=random.randrange(1000))
        api_key = access.read_secret(file=opts.triton_api_key_file or None, env=access.API_KEY_ENV)
        self.headers = access.headers(protocol, api_key=api_key)
        if protocol == "grpc":
            self.mod, url = grpcclient, opts.triton_grpc
            self.client = grpcclient.InferenceServerClient(
                url, **access.grpc_tls_kwargs(opts.triton_tls_ca or None, opts.triton_tls_cert or None,
                                         opts.triton_tls_key or None))
        else:
            self.mod, url = httpclient, opts.triton_http
            self.client = httpclient.InferenceServerClient(url, concurrency=1, network_timeout=60.0)
        _open_clients.add(self)

    def classify(self) -> None:
        sealed = self.sealer.next()  # sealing is client work: outside the timed call
        inp = self.mod.InferInput("ENVELOPE", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[sealed]], dtype=np.object_))
        outputs = [self.mod.InferRequestedOutput("PROBS", class_count=self.top_k),
                   self.mod.InferRequestedOutput("AUDIT_REF")]
        start = time.perf_counter()
        exc, length = None, 0
        try:
            result = self.client.infer(self.pipeline, [inp], outputs=outputs, request_id=uuid.uuid4().hex,
                                       parameters={"client_id": self.client_id}, headers=self.headers)
            classes = result.as_numpy("PROBS").reshape(-1)
            length = sum(len(c) for c in classes)
            if len(classes) != self.top_k or not result.as_numpy("AUDIT_REF").reshape(-1)[0]:
                exc = ValueError(f"answer has {len(classes)} classes (asked {self.top_k}) or no audit ref")
        except InferenceServerException as e:
            exc = TritonFailure(f"{e.status()}: {e.message()}")
        self.events.request.fire(request_type=self.protocol, name=self.pipeline,
                                 response_time=(time.perf_counter() - start) * 1000.0,
                                 response_length=length, exception=exc, context={})

    def close(self) -> None:
        """Close and drop the tritonclient now, while gevent's hub runs: tritonclient.grpc closes its
        channel again in ``__del__``, and a close during interpreter shutdown can hang under gevent."""
        if self.client is not None:
            self.client.close()
            self.client = None


_open_clients: "weakref.WeakSet[PipelineClient]" = weakref.WeakSet()


@events.quitting.add_listener
def _close_leftovers(**_kw):
    """Users stopped without on_stop (killed at --stop-timeout) still hold a client: close it here."""
    for client in list(_open_clients):
        client.close()


class PipelineUser(User):
    abstract = True
    protocol = ""

    def __init__(self, environment):
        super().__init__(environment)
        self.client = PipelineClient(environment, self.protocol)

    def wait_time(self):
        opts = self.environment.parsed_options
        return random.uniform(opts.wait_min, max(opts.wait_min, opts.wait_max))

    @task
    def classify(self):
        self.client.classify()

    def on_stop(self):
        self.client.close()


class GrpcPipelineUser(PipelineUser):
    protocol = "grpc"


class HttpPipelineUser(PipelineUser):
    protocol = "http"
