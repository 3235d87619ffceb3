"""The audit context preprocess hands postprocess (AUDIT_CTX), authenticated.

Triton lets any client that may call inference call ``postprocess`` directly, with
any AUDIT_CTX: unauthenticated, the context would let anyone write a ``served``
record for any client id. So preprocess MACs the context (HMAC-SHA256 under the
server-internal key, ``rtinfer.internal_key``) and binds it to the request id and
the time it was made; postprocess refuses, per request, a context whose MAC,
request id or freshness does not check, and one it has already used (the MACs
of used contexts are kept for the freshness window in a store shared by all
postprocess instances, ``rtinfer.replay.ReplayGuard``). A MAC that does not check is
called forged only after postprocess has read the key file again (a rotation may reach
preprocess first: ``rtinfer.internal_key``). What a MAC cannot cover:
the logits of a direct call with a genuine, unused context (the gateway closes that).
"""
from __future__ import annotations

import hashlib
import hmac
import json

from rtinfer.errors import Refusal

FIELDS = {"request_id": str, "client_id": str, "key_id": str, "pipeline": str, "envelope_sha256": str,
          "preprocess_version": str, "t_start_ns": int, "t_pre_done_ns": int}
DEFAULT_MAX_AGE_S = 60.0
STORE_KEY_ID = "audit_ctx"  # the id the used contexts' MACs are kept under in the replay store


def _body(ctx: dict) -> bytes:
    return json.dumps({k: v for k, v in ctx.items() if k != "mac"}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def mac_of(ctx: dict, key: bytes) -> str:
    return hmac.new(key, b"rtinfer-audit-ctx-v1\0" + _body(ctx), hashlib.sha256).hexdigest()


def seal(ctx: dict, key: bytes | None) -> bytes:
    """The wire form: the context's JSON with its MAC (no MAC without a key: unit tests only)."""
    out = dict(ctx)
    if key is not None:
        out["mac"] = mac_of(ctx, key)
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode()


def open_context(raw: bytes, key: bytes | list[bytes] | None, request_id: str) -> dict:
    """The context, if it is well formed, carries a valid MAC under one of the accepted keys (when
    any is set: the current one and the one before a rotation), and names the request it arrives
    with; else Refusal. Freshness and single use: ``issued_ms`` and the
    replay store, checked for the whole batch by the caller."""
    try:
        ctx = json.loads(raw)
    except (ValueError, RecursionError):
        ctx = None
    if not isinstance(ctx, dict) or any(not isinstance(ctx.get(k), t) or isinstance(ctx.get(k), bool)
                                        for k, t in FIELDS.items()):
        raise Refusal("bad_context", "AUDIT_CTX is not an audit context made by preprocess")
    if key is not None:
        mac = ctx.get("mac")
        accepted = [key] if isinstance(key, bytes) else list(key)
        if not isinstance(mac, str) or not any([hmac.compare_digest(mac, mac_of(ctx, k)) for k in accepted]):
            raise Refusal("context_forged", "AUDIT_CTX is not authenticated: its MAC does not check")
    if ctx["request_id"] != request_id:
        raise Refusal("context_request_id", "AUDIT_CTX was made for another request id")
    return ctx


def issued_ms(ctx: dict) -> int:
    return ctx["t_pre_done_ns"] // 1_000_000


def nonce(ctx: dict) -> bytes:
    return bytes.fromhex(ctx["mac"]) if isinstance(ctx.get("mac"), str) else hashlib.sha256(_body(ctx)).digest()
