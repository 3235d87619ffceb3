"""rtinfer.guard: how a request's exception becomes its refusal (the adapters' use of it is tested on a
real server in test_fail_closed.py and test_faults_image_fuzz.py)."""
from rtinfer import guard
from rtinfer.errors import NOT_AUTHENTICATED, SERVER_TROUBLE, RejectedRequest, Unavailable


def test_client_mistakes_keep_their_reason_and_public_message():
    r = guard.refusal(RejectedRequest("unknown_key", "unknown key id 'k9'", public=NOT_AUTHENTICATED))
    assert (r.reason, r.public, r.retryable) == ("unknown_key", NOT_AUTHENTICATED, False)
    assert r.detail == "unknown key id 'k9'" and r.message == NOT_AUTHENTICATED


def test_server_trouble_is_retryable_and_tells_the_client_nothing_more():
    r = guard.refusal(Unavailable("replay_store_unavailable", "OperationalError: database is locked"))
    assert r.retryable and r.public == SERVER_TROUBLE and "locked" in r.detail


def test_unexpected_exceptions_never_reach_the_client():
    def boom():
        raise KeyError("/srv/secret/path.py")
    on_client_data = guard.attempt(boom, blame=guard.CLIENT)
    on_server = guard.attempt(boom)
    assert (on_client_data.reason, on_client_data.retryable) == ("bad_input", False)
    assert (on_server.reason, on_server.retryable) == ("internal_error", True)
    for r in (on_client_data, on_server):
        assert "KeyError" in r.detail and "KeyError" not in r.public and "/srv" not in r.public
    assert guard.attempt(lambda: (_ for _ in ()).throw(MemoryError()), blame=guard.CLIENT).retryable
    assert guard.attempt(lambda x: x + 1, 1) == 2
