"""Fail closed, one request at a time: whatever a request's step raises becomes that request's refusal.

Raising out of a Triton ``execute()`` fails every request of the dynamic batch and
sends the traceback (with server paths) to the client. Every stage therefore runs
each request's steps through ``attempt`` and every adapter answers through
``respond``: a ``Refusal`` raised keeps its reason; any other exception becomes
a refusal with a fixed public message, so no exception name, message or path
reaches a client. The detail goes to the audit record instead.
"""
from __future__ import annotations

from rtinfer.errors import SERVER_TROUBLE, Refusal, Unavailable

CLIENT, SERVER = "client", "server"
BAD_INPUT = "the request could not be processed: its input is malformed"
_DETAIL_CHARS = 300


def refusal(exc: BaseException, blame: str = SERVER) -> Refusal:
    """Classify an exception. ``blame``: who is at fault for an exception the code did not expect
    (CLIENT for a step that only reads the request's own bytes, like decoding its image)."""
    if isinstance(exc, Refusal):  # a copy: no traceback kept alive with the answer
        return Refusal(exc.reason, exc.detail[:_DETAIL_CHARS * 4], exc.public, exc.retryable)
    detail = f"{type(exc).__name__}: {exc}"[:_DETAIL_CHARS]
    if blame == CLIENT and not isinstance(exc, (MemoryError, RecursionError)):
        return Refusal("bad_input", detail, BAD_INPUT, False)
    return Refusal("internal_error", detail, SERVER_TROUBLE, True)


def attempt(fn, *args, blame: str = SERVER, **kwargs):
    """``fn(*args, **kwargs)``, or the ``Refusal`` for whatever it raised (never raises an Exception)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - this is the one place that turns anything into a refusal
        return refusal(exc, blame)


def unavailable(reason: str, detail: str) -> Refusal:
    """A refusal for the server's own trouble with a component (audit, replay store)."""
    return refusal(Unavailable(reason, detail[:_DETAIL_CHARS]))


def respond(pb_utils, requests, handler, after=None) -> list | None:
    """The body of every adapter's ``execute()``: ``handler(requests)`` returns, per request, a list of
    ``pb_utils.Tensor`` or a ``Refusal``; this turns refusals into per-request Triton errors and, if the
    handler itself raised, answers every request UNAVAILABLE rather than raising out of ``execute()``.

    ``after``: work that no answer waits for (the stages' metrics: each update is a round trip to the
    server process). The answers are then sent first through each request's response sender and
    ``after()`` runs once they are on their way, if the handler returned (never raising);
    ``execute()`` returns None."""
    handled = False
    try:
        results = handler(requests)
        if len(results) != len(requests):
            raise RuntimeError(f"{len(results)} results for {len(requests)} requests")
        handled = True
    except Exception as exc:  # noqa: BLE001
        results = [refusal(exc)] * len(requests)
    responses = [_response(pb_utils, result) for result in results]
    if after is None:
        return responses
    for request, response in zip(requests, responses):
        _send(pb_utils, request, response)
    if handled:  # a failed handler left nothing of this batch to report (only the last batch's)
        attempt(after)
    return None


def _response(pb_utils, result):
    if not isinstance(result, Refusal):
        try:
            return pb_utils.InferenceResponse(output_tensors=result)
        except Exception as exc:  # noqa: BLE001
            result = refusal(exc)
    code = pb_utils.TritonError.UNAVAILABLE if result.retryable else pb_utils.TritonError.INVALID_ARG
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(result.public, code))


def _send(pb_utils, request, response) -> None:
    """The final (only) response of ``request``; one that cannot be sent becomes an UNAVAILABLE error."""
    final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    try:
        request.get_response_sender().send(response, flags=final)
    except Exception as exc:  # noqa: BLE001
        try:
            request.get_response_sender().send(_response(pb_utils, refusal(exc)), flags=final)
        except Exception as again:  # noqa: BLE001 - nothing left to answer with; the server logs it
            pb_utils.Logger.log_error(f"a response could not be sent: {type(again).__name__}")
