"""Why a request is refused: the client's mistake (INVALID_ARG) or the server's own trouble (UNAVAILABLE)."""


class RejectedRequest(ValueError):
    """A request the service refuses; ``reason`` is a short machine-readable tag for the audit.

    ``str(exc)`` is the detail for the audit; ``public`` is what the client is told (the
    same unless the detail would tell an unauthenticated caller something, e.g. whether
    a key id exists)."""

    retryable = False

    def __init__(self, reason: str, message: str, *, public: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.public = message if public is None else public


class Unavailable(RejectedRequest):
    """The server cannot handle this request now (audit or replay store trouble): retry later.
    The client is told only that; the detail is for the audit."""

    retryable = True

    def __init__(self, reason: str, message: str, *, public: str | None = None):
        super().__init__(reason, message, public=SERVER_TROUBLE if public is None else public)


SERVER_TROUBLE = "the server could not process this request now; retry later"


# What a caller that fails before authentication is told, whatever the detail (unknown or
# retired key id, audience not served here, wrong key): the audit keeps the detail.
NOT_AUTHENTICATED = "authentication failed: the envelope does not open for this service (key id, audience or contents)"
