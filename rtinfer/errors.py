"""Why a request is refused: the client's mistake (INVALID_ARG) or the server's own trouble (UNAVAILABLE)."""


class Refusal(ValueError):
    """A request the service refuses: raised where a step finds out, and returned per request by the stages
    (``rtinfer.guard``: one request's refusal never fails another's).

    ``reason`` is a short machine-readable tag for the audit; ``detail`` (``str(refusal)``) what went wrong,
    for the audit; ``public`` is what the client is told (the detail unless it would tell an unauthenticated
    caller something, e.g. whether a key id exists); ``retryable``: the server's trouble (UNAVAILABLE) rather
    than the client's mistake (INVALID_ARG)."""

    retryable = False

    def __init__(self, reason: str, detail: str, public: str | None = None, retryable: bool | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.public = detail if public is None else public
        if retryable is not None:
            self.retryable = retryable

    @property
    def message(self) -> str:
        return self.public

    def _key(self) -> tuple:
        return self.reason, self.detail, self.public, self.retryable

    def __eq__(self, other) -> bool:
        return isinstance(other, Refusal) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self._key()!r}"


class Unavailable(Refusal):
    """The server cannot handle this request now (audit or replay store trouble): retry later.
    The client is told only that; the detail is for the audit."""

    retryable = True

    def __init__(self, reason: str, detail: str, public: str | None = None):
        super().__init__(reason, detail, SERVER_TROUBLE if public is None else public)


SERVER_TROUBLE = "the server could not process this request now; retry later"


# What a caller that fails before authentication is told, whatever the detail (unknown or
# retired key id, audience not served here, wrong key): the audit keeps the detail.
NOT_AUTHENTICATED = "authentication failed: the envelope does not open for this service (key id, audience or contents)"
