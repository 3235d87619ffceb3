"""Shared replay protection on Redis (issue 21, 1): rtinfer.replay_redis on fakeredis (unit) and on a real
redis-server (rtinfer.launch.redis_server: ACL user, AOF, TLS), the stages on it, and a real tritonserver whose
preprocess and postprocess use a Redis over TLS: replayed, Redis down (UNAVAILABLE, audited), Redis back."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
import urllib.request
import uuid

import fakeredis
import numpy as np
import pytest
import redis
from tritonclient.utils import InferenceServerException

from clients import samples
from clients.classify import PipelineClient
from rtinfer import audit, audit_context, envelope, replay
from rtinfer.errors import Refusal, Unavailable
from rtinfer.keyring import Keyring
from rtinfer.launch.process import free_port
from rtinfer.launch.redis_server import RedisServer, redis_binary
from rtinfer.launch.server import TritonServer
from rtinfer.postprocess import Postprocessor
from rtinfer.preprocess import Accepted, Preprocessor, Request
from rtinfer.replay_redis import RedisReplayGuard, client_options
from rtinfer.stage_config import StageConfig

from conftest import REPO, model_repository_with, require_model
from helpers import outcome

KEY = os.urandom(32)
CTX_KEY = os.urandom(32)
LABELS = tuple(f"c{i}" for i in range(1000))


def now_ms() -> int:
    return int(time.time() * 1000)


def fake_guard(server=None, **kw) -> RedisReplayGuard:
    client = fakeredis.FakeRedis(server=server or fakeredis.FakeServer())
    return RedisReplayGuard("redis://rtinfer@127.0.0.1:6379/0", namespace="nonce", client=client, **kw)


def sealed(client_id="c") -> bytes:
    return envelope.seal(samples.photo("coffee"), KEY, key_id="k1", client_id=client_id, pipeline="pipeline")


def preprocessor(path, guard) -> Preprocessor:
    return Preprocessor(Keyring({"k1": KEY}), audit.AuditWriter(path), pipelines={"pipeline"}, replay=guard,
                        ctx_key=CTX_KEY)


@pytest.fixture(scope="module")
def real_redis():
    try:
        redis_binary()
    except RuntimeError as exc:  # make test installs it first (make redis): a failure, not a skip
        pytest.fail(str(exc))
    with RedisServer() as r:
        yield r


def real_guard(r: RedisServer, namespace="nonce", **kw) -> RedisReplayGuard:
    return RedisReplayGuard(r.url, namespace=namespace, password_file=r.password_file, ca_file=r.ca_file, **kw)


# --- the store on fakeredis --------------------------------------------------------------------

def test_a_nonce_is_admitted_once_within_its_window():
    g = fake_guard()
    t = now_ms()
    assert g.admit([("k1", b"n1", t), ("k1", b"n2", t)]) == [None, None]
    [again] = g.admit([("k1", b"n1", t)])
    assert again.reason == "replayed"
    assert g.admit([("k2", b"n1", t)]) == [None]  # another key's nonce is another nonce
    old, ahead = g.admit([("k1", b"n3", t - 301_000), ("k1", b"n4", t + 31_000)])
    assert (old.reason, ahead.reason) == ("expired", "from_future")
    assert g.admit([("k1", b"n3", t)]) == [None]  # refused by the window: nothing was recorded


def test_the_same_nonce_twice_in_one_batch_is_admitted_once():
    """The second SET of one call finds that call's own token: a replay all the same."""
    g = fake_guard()
    t = now_ms()
    first, second = g.admit([("k1", b"same", t), ("k1", b"same", t)])
    assert first is None and second.reason == "replayed"


def test_a_nonce_is_kept_for_window_plus_skew_plus_margin():
    """An envelope passes the window check from sealed - skew to sealed + window: a nonce admitted at the
    earliest must still be held at the latest (plus the margin for replicas' clocks)."""
    server = fakeredis.FakeServer()
    g = fake_guard(server, window_s=300, future_skew_s=30, margin_s=60)
    g.admit([("k1", b"n", now_ms())])
    ttl = fakeredis.FakeRedis(server=server).pttl(g.key("k1", b"n"))
    assert 389_000 < ttl <= 390_000
    assert g.key("k1", b"n").startswith(b"rtinfer:nonce:")


def test_release_forgets_only_what_it_is_given():
    g = fake_guard()
    t = now_ms()
    g.admit([("k1", b"a", t), ("k1", b"b", t)])
    g.release([("k1", b"a")])
    assert g.admit([("k1", b"a", t)]) == [None]
    assert g.admit([("k1", b"b", t)])[0].reason == "replayed"
    assert g.record([("k1", b"c", 0)]) == [True] and g.record([("k1", b"c", 0)]) == [False]  # no window


def test_a_store_that_does_not_answer_raises_unavailable_and_recovers():
    server = fakeredis.FakeServer()
    g = fake_guard(server)
    server.connected = False
    with pytest.raises(Unavailable) as info:
        g.admit([("k1", b"n", now_ms())])
    assert info.value.reason == "replay_store_unavailable" and info.value.retryable
    assert "redis://rtinfer@127.0.0.1:6379/0" in str(info.value)
    assert g.check() and g.size() is None
    g.release([("k1", b"n")])  # best effort: never raises
    server.connected = True
    assert g.admit([("k1", b"n", now_ms())]) == [None] and g.check() == ""


def test_preprocess_on_a_failing_store_refuses_unavailable_and_audits(tmp_path):
    """Fail closed: never served without a replay check; refused retryable, audited; served once it answers."""
    server = fakeredis.FakeServer()
    pre = preprocessor(tmp_path / "pre.jsonl", fake_guard(server))
    server.connected = False
    [res] = pre.run([Request(sealed(), request_id="down")])
    assert isinstance(res, Refusal) and res.retryable and res.reason == "replay_store_unavailable"
    assert "redis" not in res.public and "127.0.0.1" not in res.public  # the detail is for the audit only
    server.connected = True
    [ok] = pre.run([Request(sealed(), request_id="up")])
    assert isinstance(ok, Accepted)
    pre.audit.close()
    [rec] = audit.read_records(tmp_path)
    assert (rec["request_id"], rec["event"], rec["reason"], rec["retryable"]) == \
        ("down", "rejected", "replay_store_unavailable", True)


def test_postprocess_on_a_failing_context_store_refuses_unavailable_and_audits(tmp_path):
    server = fakeredis.FakeServer()
    ctx_store = RedisReplayGuard("redis://rtinfer@127.0.0.1:6379/0", namespace="ctx", window_s=60,
                                 future_skew_s=5, client=fakeredis.FakeRedis(server=server))
    pre = preprocessor(tmp_path / "pre.jsonl", fake_guard())
    post = Postprocessor(audit.AuditWriter(tmp_path / "post.jsonl"), LABELS, models={}, ctx_store=ctx_store)
    [acc] = pre.run([Request(sealed(), request_id="r1")])
    server.connected = False
    _, [ref] = post.run(np.zeros((1, 1000), np.float32), [acc.context], ["r1"])
    assert isinstance(ref, Refusal) and ref.retryable and ref.reason == "replay_store_unavailable"
    post.audit.close()
    [rec] = [r for r in audit.read_records(tmp_path / "post.jsonl")]
    assert rec["event"] == "rejected" and rec["reason"] == "replay_store_unavailable"


# --- configuration -----------------------------------------------------------------------------

def test_urls_and_secrets_are_checked(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    os.chmod(pw, 0o600)
    where, kw = client_options("rediss://rtinfer@10.0.0.5:6380/2", password_file=pw, ca_file=tmp_path / "ca.pem")
    assert where == "rediss://rtinfer@10.0.0.5:6380/2" and kw["password"] == "s3cret" and kw["db"] == 2
    assert kw["ssl"] and kw["ssl_cert_reqs"] == "required" and kw["ssl_check_hostname"]
    assert kw["socket_timeout"] == kw["socket_connect_timeout"] == 0.05
    assert kw["retry"].get_retries() == 1  # a broken connection once, at once; never a timeout
    for bad, why in [("redis://rtinfer:s3cret@h:1/0", "never from the URL"),
                     ("redis://h:1/0?ssl_cert_reqs=none", "give only"),
                     ("http://h:1/0", "not redis://"), ("redis://h:1/x", "not a number")]:
        with pytest.raises(ValueError, match=why):
            client_options(bad)
    with pytest.raises(ValueError, match="not rediss://"):
        client_options("redis://h:1/0", ca_file=tmp_path / "ca.pem")
    os.chmod(pw, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        client_options("redis://rtinfer@h:1/0", password_file=pw)


def stage_config(tmp_path, **params) -> StageConfig:
    cfg = {"parameters": {k: {"string_value": v} for k, v in {"audit_dir": str(tmp_path), **params}.items()}}
    return StageConfig({"model_config": json.dumps(cfg), "model_instance_name": "preprocess_0",
                        "model_repository": str(tmp_path / "preprocess")})


def test_stage_config_chooses_the_store(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RTINFER_REPLAY_STORE", raising=False)
    assert isinstance(stage_config(tmp_path).replay_guard(), replay.ReplayGuard)  # sqlite, the default
    pw = tmp_path / "pw"
    pw.write_text("x")
    os.chmod(pw, 0o600)
    port = free_port()  # nothing listens: the stage loads and says so; requests will be refused UNAVAILABLE
    cfg = stage_config(tmp_path, replay_store=f"redis://rtinfer@127.0.0.1:{port}/0", replay_redis_password_file=str(pw))
    guard, ctx = cfg.replay_guard(), cfg.context_store()
    assert isinstance(guard, RedisReplayGuard) and isinstance(ctx, RedisReplayGuard)
    assert guard.prefix == b"rtinfer:nonce:" and ctx.prefix == b"rtinfer:ctx:"
    assert ctx.ttl_ms == (60 + 5 + 60) * 1000
    assert "refused UNAVAILABLE until it answers" in capsys.readouterr().err
    monkeypatch.setenv("RTINFER_REPLAY_STORE", f"redis://rtinfer@127.0.0.1:{port}/0")
    monkeypatch.setenv("RTINFER_REDIS_PASSWORD_FILE", str(pw))
    assert isinstance(stage_config(tmp_path).replay_guard(), RedisReplayGuard)  # empty parameter: the environment
    assert isinstance(stage_config(tmp_path, replay_store="sqlite").replay_guard(), replay.ReplayGuard)
    os.chmod(pw, 0o640)
    with pytest.raises(PermissionError):  # the stage refuses to load
        stage_config(tmp_path).replay_guard()
    with pytest.raises(ValueError, match="must be 'sqlite'"):
        stage_config(tmp_path, replay_store="memcached://h").replay_guard()


# --- a real redis-server -------------------------------------------------------------------------

def test_one_envelope_to_two_replicas_is_served_once(tmp_path, real_redis):
    """Two preprocess stages with their own audit and SQLite directories (two replicas) but one Redis: the
    second is refused replayed and audits it; the audit context, taken to another replica's postprocess
    after its own, is refused context_replayed."""
    a = preprocessor(tmp_path / "a" / "pre.jsonl", real_guard(real_redis))
    b = preprocessor(tmp_path / "b" / "pre.jsonl", real_guard(real_redis))
    env = sealed()
    [acc] = a.run([Request(env, request_id="once")])
    [again] = b.run([Request(env, request_id="once-more")])
    assert isinstance(acc, Accepted)
    assert isinstance(again, Refusal) and again.reason == "replayed" and not again.retryable
    b.audit.close()
    [rec] = audit.read_records(tmp_path / "b")
    assert (rec["request_id"], rec["reason"]) == ("once-more", "replayed")

    posts = [Postprocessor(audit.AuditWriter(tmp_path / d / "post.jsonl"), LABELS, models={},
                           ctx_store=real_guard(real_redis, "ctx", window_s=60, future_skew_s=5)) for d in "ab"]
    logits = np.zeros((1, 1000), np.float32)
    _, [ref] = posts[0].run(logits, [acc.context], ["once"])
    _, [stolen] = posts[1].run(logits, [acc.context], ["once"])
    assert isinstance(ref, str) and isinstance(stolen, Refusal) and stolen.reason == "context_replayed"
    assert audit_context.nonce(json.loads(acc.context))  # a MAC'd context: its MAC is the nonce


def test_the_acl_user_may_run_only_what_the_stages_need(real_redis):
    c = real_redis.client()
    assert c.ping() and c.set("rtinfer:x", 1, nx=True, px=1000, get=True) is None and c.delete("rtinfer:x") == 1
    for cmd in (["FLUSHALL"], ["FLUSHDB"], ["KEYS", "*"], ["SCAN", "0"], ["CONFIG", "GET", "*"],
                ["CONFIG", "SET", "appendonly", "no"], ["GET", "rtinfer:x"], ["EVAL", "return 1", "0"],
                ["SHUTDOWN"], ["ACL", "LIST"], ["BGREWRITEAOF"], ["MONITOR"]):
        with pytest.raises(redis.exceptions.NoPermissionError):
            c.execute_command(*cmd)
    with pytest.raises(redis.exceptions.NoPermissionError):  # only keys rtinfer:*
        c.set("other", 1)
    anonymous = redis.Redis(host=real_redis.host, port=real_redis.port, socket_timeout=1)
    with pytest.raises(redis.exceptions.AuthenticationError):  # the default user is off
        anonymous.ping()
    wrong = redis.Redis(host=real_redis.host, port=real_redis.port, username="rtinfer", password="guess",
                        socket_timeout=1)
    with pytest.raises(redis.exceptions.AuthenticationError):
        wrong.ping()
    assert oct(real_redis.password_file.stat().st_mode & 0o777) == "0o600"
    assert hashlib.sha256(real_redis.password_file.read_bytes().strip()).hexdigest() in \
        (real_redis.workdir / "users.acl").read_text()  # the ACL file holds only the hash


def test_redis_that_hangs_refuses_within_the_timeout_and_recovers(real_redis):
    """SIGSTOP: the kernel still accepts connections, Redis answers nothing. Each admit gives up after one
    timeout (300 ms here; not retried: that would take two), and the same guard works again once Redis
    answers: no restart."""
    g = real_guard(real_redis, timeout_ms=300)
    assert g.admit([("k1", os.urandom(12), now_ms())]) == [None]
    real_redis.pause()
    try:
        for _ in range(3):  # the pooled connection, then new connections
            t0 = time.monotonic()
            with pytest.raises(Unavailable, match="Timeout"):
                g.admit([("k1", os.urandom(12), now_ms())])
            assert 0.25 < time.monotonic() - t0 < 0.5
    finally:
        real_redis.resume()
    assert g.admit([("k1", os.urandom(12), now_ms())]) == [None]


def test_nonces_survive_a_redis_crash_and_restart(tmp_path):
    """AOF (appendfsync everysec): SIGKILL after the fsync second, restart on the same directory and port,
    the nonce is still refused; the guard made before the crash reconnects by itself."""
    with RedisServer(tmp_path / "redis") as r:
        g = real_guard(r)
        t = now_ms()
        assert g.admit([("k1", b"kept", t)]) == [None]
        time.sleep(1.5)  # past everysec's fsync
        r.kill()
        with pytest.raises(Unavailable, match="ConnectionError"):
            g.admit([("k1", b"while-down", t)])
        r.start()
        assert g.admit([("k1", b"kept", t)])[0].reason == "replayed"
        assert g.admit([("k1", b"after", t)]) == [None]


class DropOneReply:
    """A TCP relay to Redis that, once armed, passes one request containing SET through, swallows Redis's
    answer and closes the connection: the server did it, the client never heard."""

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed, self.swallow, self.swallowed = threading.Event(), threading.Event(), threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._up, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._down, args=(client, upstream), daemon=True).start()

    def _up(self, client, upstream):
        try:
            while data := client.recv(65536):
                if self.armed.is_set() and b"SET" in data:
                    self.armed.clear()
                    self.swallow.set()
                    upstream.sendall(data)
                    self.swallowed.wait(5)  # Redis answered (it did the SETs); the client hears nothing
                    break
                upstream.sendall(data)
        except OSError:
            pass
        for s in (client, upstream):
            s.close()

    def _down(self, client, upstream):
        try:
            while data := upstream.recv(65536):
                if self.swallow.is_set():
                    self.swallow.clear()
                    self.swallowed.set()
                    return
                client.sendall(data)
        except OSError:
            pass

    def close(self):
        self.listener.close()


def test_a_lost_answer_retried_on_a_new_connection_is_not_a_false_replay(real_redis):
    """Redis ran the SET but the connection broke before its answer: the client reconnects and sends the
    pipeline again, and finds its own token there (admitted), not someone else's (replayed)."""
    relay = DropOneReply(real_redis.port)
    try:
        g = RedisReplayGuard(f"redis://rtinfer@127.0.0.1:{relay.port}/0", namespace="nonce",
                             password_file=real_redis.password_file, timeout_ms=1000)
        t = now_ms()
        assert g.admit([("k1", b"warm", t)]) == [None]
        relay.armed.set()
        assert g.admit([("k1", b"lost-answer", t), ("k1", b"other", t)]) == [None, None]
        assert relay.swallowed.is_set()  # the answer really was lost, and the call was sent again
        assert g.admit([("k1", b"lost-answer", t)])[0].reason == "replayed"
    finally:
        relay.close()


def test_tls_to_redis(tmp_path):
    """rediss:// checked against the CA; refused without it (a certificate nobody vouches for) and in clear."""
    with RedisServer(tmp_path / "redis", tls=True) as r:
        g = real_guard(r)
        assert r.url.startswith("rediss://") and g.admit([("k1", b"n", now_ms())]) == [None]
        assert g.admit([("k1", b"n", now_ms())])[0].reason == "replayed"
        untrusted = RedisReplayGuard(r.url, namespace="nonce", password_file=r.password_file, timeout_ms=1000)
        with pytest.raises(Unavailable, match="certificate verify failed"):
            untrusted.admit([("k1", b"m", now_ms())])
        clear = RedisReplayGuard(r.url.replace("rediss://", "redis://"), namespace="nonce",
                                 password_file=r.password_file, timeout_ms=1000)
        with pytest.raises(Unavailable):
            clear.admit([("k1", b"m", now_ms())])


# --- a real tritonserver on a Redis over TLS ---------------------------------------------------------

@pytest.fixture(scope="module")
def redis_triton(keyring_path, signing_key, tmp_path_factory):
    """The pipeline with preprocess and postprocess on one Redis (TLS), as replica 'ra' of fleet ra, rb."""
    require_model()
    base = tmp_path_factory.mktemp("redis-triton")
    with RedisServer(base / "redis", tls=True) as r:
        repo = model_repository_with(base / "repo", {"preprocess": r.params, "postprocess": r.params})
        audit_dir = base / "fleet" / "ra"
        with TritonServer(repo, keyring=str(keyring_path), audit_dir=str(audit_dir),
                          audit_signing_key=str(signing_key[0]), workdir=base / "triton",
                          env={"RTINFER_REPLICA_ID": "ra", "RTINFER_FLEET_REPLICAS": "ra,rb"}) as srv:
            srv.redis, srv.audit_dir = r, audit_dir
            yield srv


def refused(client, env) -> tuple[str, str]:
    rid = uuid.uuid4().hex
    with pytest.raises(InferenceServerException) as info:
        client.infer_envelope(env, request_id=rid)
    return outcome(info.value), rid


def test_served_replayed_redis_down_and_back_through_triton(redis_triton, keys):
    srv, r = redis_triton, redis_triton.redis
    c = PipelineClient(srv.grpc_url, key=keys.key("k1"), key_id="k1", client_id="fleet-user")
    try:
        env = c.seal(samples.photo("coffee"))
        first = c.infer_envelope(env)
        assert first.predictions[0].index == 967
        assert refused(c, env)[0] == "invalid"  # replayed
        r.stop()
        down = [refused(c, c.seal(samples.photo("coffee"))) for _ in range(2)]
        assert [o for o, _ in down] == ["unavailable"] * 2
        r.start()
        assert c.classify(samples.photo("coffee")).predictions[0].index == 967  # no Triton restart
        r.pause()  # hangs: refused within the timeout, not stalled
        t0 = time.monotonic()
        hung = refused(c, c.seal(samples.photo("coffee")))
        assert hung[0] == "unavailable" and time.monotonic() - t0 < 2.0
        r.resume()
        r.stop()
        r.start()  # restarted while idle: the next request is served
        last = c.classify(samples.photo("coffee"))
    finally:
        c.close()
    recs = {x["request_id"]: x for x in audit.read_records(srv.audit_dir) if x.get("request_id")}
    assert recs[first.request_id]["event"] == "served" and recs[last.request_id]["event"] == "served"
    for _, rid in down + [hung]:
        assert recs[rid]["event"] == "rejected" and recs[rid]["reason"] == "replay_store_unavailable"
        assert recs[rid]["retryable"] is True
    assert all(x["replica"] == "ra" for x in audit.read_records(srv.audit_dir))
    # Both stores are on Redis: no SQLite store was made beside the audit.
    assert not list(srv.audit_dir.glob("*.sqlite3"))


def test_the_classifier_file_served_is_a_metric(redis_triton):
    """rtinfer_model_info: the sha256 of the file this replica loaded (docs/scaling.md, the rollout alert)."""
    text = urllib.request.urlopen(redis_triton.metrics_url, timeout=5).read().decode()
    digest = hashlib.sha256((REPO / "classifier_onnx" / "1" / "model.onnx").read_bytes()).hexdigest()
    found = re.findall(r'^rtinfer_model_info\{([^}]*)\} 1$', text, re.M)
    labels = [dict(re.findall(r'(\w+)="([^"]*)"', f)) for f in found]
    assert {"model": "classifier_onnx", "file": "model.onnx", "sha256": digest, "stage": "postprocess"} in labels
