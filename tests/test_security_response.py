"""Sealed responses: the result comes back encrypted to the request's key, bound to that request."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from clients import samples
from clients.classify import PipelineClient
from rtinfer import audit, envelope
from rtinfer.errors import Refusal

KEY = os.urandom(32)


def test_response_is_bound_to_its_request():
    req = envelope.seal(b"img", KEY, key_id="k1", client_id="alice", pipeline="pipeline")
    other = envelope.seal(b"img", KEY, key_id="k1", client_id="alice", pipeline="pipeline")
    res = envelope.seal_response(b'{"ok":1}', KEY, key_id="k1", client_id="alice", pipeline="pipeline",
                                 request_sha256=hashlib.sha256(req).hexdigest())
    assert envelope.open_response(res, KEY, req).plaintext == b'{"ok":1}'
    with pytest.raises(Refusal, match="does not answer this request"):
        envelope.open_response(res, KEY, other)
    with pytest.raises(Refusal, match="does not answer"):
        envelope.open_response(req, KEY, req)  # a request is not a response


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_sealed_result_matches_the_plain_one(server, keys, audit_dir, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    plain = PipelineClient(url, protocol=protocol, key=keys.key("k2"), key_id="k2", client_id="sealer")
    sealed = PipelineClient(url, protocol=protocol, key=keys.key("k2"), key_id="k2", client_id="sealer",
                            seal_response=True)
    image = samples.photo("chelsea")
    a, b = plain.classify(image, top_k=3), sealed.classify(image, top_k=3)
    assert [p.index for p in a.predictions] == [p.index for p in b.predictions]
    assert np.allclose([p.score for p in a.predictions], [p.score for p in b.predictions], atol=1e-5)
    [rec] = [r for r in audit.read_records(audit_dir) if r.get("request_id") == b.request_id]
    assert rec["hash"] == b.audit_ref and rec["response_sealed"] is True
    plain.close(), sealed.close()


def test_what_a_proxy_sees_holds_no_result(server, keys):
    """Raw HTTP: AUDIT_REF is an RTE1 envelope, PROBS all zeros; a reply fed back as a request is refused.
    No seal_response parameter is sent: the sealed header alone decides (a proxy that drops parameters
    cannot downgrade the answer)."""
    c = PipelineClient(server.http_url, protocol="http", key=keys.key("k1"), key_id="k1", client_id="proxy-test")
    sealed_req = c.seal(samples.photo("coffee"), seal_response=True)
    raw = httpclient.InferenceServerClient(server.http_url)
    inp = httpclient.InferInput("ENVELOPE", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[sealed_req]], dtype=np.object_))
    out = raw.infer("pipeline", [inp], request_id="proxy-1",
                    parameters={"client_id": "proxy-test", "top_k": 2},
                    outputs=[httpclient.InferRequestedOutput("PROBS", binary_data=True),
                             httpclient.InferRequestedOutput("AUDIT_REF", binary_data=True)])
    reply = out.as_numpy("AUDIT_REF").reshape(-1)[0]
    assert reply.startswith(envelope.MAGIC) and b"espresso" not in reply
    assert not out.as_numpy("PROBS").any()
    body = json.loads(envelope.open_response(reply, keys.key("k1"), sealed_req).plaintext)
    assert body["request_id"] == "proxy-1" and body["predictions"][0][1:] == [967, "espresso"]
    with pytest.raises(InferenceServerException) as info:
        c.infer_envelope(reply)
    assert "sealed response, not a request" in info.value.message()
    raw.close(), c.close()
