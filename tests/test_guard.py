"""rtinfer.guard: how a request's exception becomes its refusal (the adapters' use of it is tested on a
real server in test_fail_closed.py and test_faults_image_fuzz.py)."""
from rtinfer import guard
from rtinfer.errors import NOT_AUTHENTICATED, SERVER_TROUBLE, Refusal, Unavailable


def test_client_mistakes_keep_their_reason_and_public_message():
    r = guard.refusal(Refusal("unknown_key", "unknown key id 'k9'", public=NOT_AUTHENTICATED))
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


class _Pb:
    """The few pb_utils names guard.respond uses, recording what is sent (the real ones: test_fail_closed.py).
    One per test: what its Logger logged belongs to that instance."""
    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    class TritonError:
        UNAVAILABLE, INVALID_ARG = "UNAVAILABLE", "INVALID_ARG"

        def __init__(self, message, code):
            self.message, self.code = message, code

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.output_tensors, self.error = output_tensors, error

    def __init__(self):
        self.logged: list[str] = []
        logged = self.logged

        class Logger:
            @staticmethod
            def log_error(msg):
                logged.append(msg)
        self.Logger = Logger


class _Request:
    def __init__(self, log, fail_sends=0):
        self.log, self.fail_sends = log, fail_sends

    def get_response_sender(self):
        request = self

        class Sender:
            def send(self, response, flags=0):
                if request.fail_sends:
                    request.fail_sends -= 1
                    raise RuntimeError("/shm/region: out of memory")
                request.log.append(("send", request, response, flags))
        return Sender()


def test_answers_are_sent_before_the_after_work_and_nothing_raises():
    log, pb = [], _Pb()
    reqs = [_Request(log), _Request(log, fail_sends=1), _Request(log, fail_sends=2)]
    refused = Refusal("bad_input", "x", guard.BAD_INPUT, False)
    out = guard.respond(pb, reqs, lambda rs: [["t"], refused, ["t"]],
                        after=lambda: log.append(("after",)) or 1 / 0)  # after() fails: nobody is told
    assert out is None and [e[0] for e in log] == ["send", "send", "after"]
    ok, second = log[0], log[1]
    assert ok[1] is reqs[0] and ok[2].output_tensors == ["t"] and ok[3] == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    # the request whose first send failed got an UNAVAILABLE error instead, without the exception's text
    assert second[1] is reqs[1] and second[2].error.code == "UNAVAILABLE" and "/shm" not in second[2].error.message
    assert len(pb.logged) == 1 and "/shm" not in pb.logged[0]  # the third could not be answered at all
    # a handler that raised: every request is answered UNAVAILABLE and after() does not run (it would
    # report the previous batch again)
    log.clear()
    assert guard.respond(pb, reqs[:1], lambda rs: 1 / 0, after=lambda: log.append(("after",))) is None
    assert [e[0] for e in log] == ["send"] and log[0][2].error.code == "UNAVAILABLE"


def test_without_after_the_answers_are_returned_and_a_failing_handler_refuses_every_request():
    log = []
    reqs = [_Request(log), _Request(log)]
    pb = _Pb()
    out = guard.respond(pb, reqs, lambda rs: 1 / 0)
    assert log == [] and [r.error.code for r in out] == ["UNAVAILABLE", "UNAVAILABLE"]
    assert all("ZeroDivision" not in r.error.message for r in out)
    refused = Refusal("bad_input", "x", guard.BAD_INPUT, False)
    out = guard.respond(pb, reqs, lambda rs: [refused, ["t"]])
    assert out[0].error.code == "INVALID_ARG" and out[1].output_tensors == ["t"]
