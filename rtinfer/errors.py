"""Errors that are the client's fault: they become per-request INVALID_ARG responses."""


class RejectedRequest(ValueError):
    """A request the service refuses; ``reason`` is a short machine-readable tag for the audit."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
