"""A fleet on loopback (issue 21, sections 2 and 4): two real tritonserver replicas sharing one real
redis-server replay store, behind the real gateway (HAProxy), all on free loopback ports.

- a sealed envelope served by one replica is refused ``replayed`` (and audited) by the other, sent
  directly or through the gateway;
- the gateway balances per request (one gRPC channel, one HTTP keep-alive connection) and shows
  traffic and refusals per replica; Triton's metrics of each replica through it;
- replica crash (SIGKILL under 4 clients): the gateway stops routing to it within its health check's
  bound, nothing is re-sent to the other replica, every request answered OK is audited exactly once
  across the fleet, and the fleet verify passes after the restart;
- rolling restart under load (drain through HAProxy's runtime API, restart, re-enable; each replica in
  turn): zero failed requests;
- Redis stopped under load: requests are refused UNAVAILABLE and audited, none is served unchecked,
  serving recovers when Redis is back.

Load is bounded (4 clients, counted requests, time limits) and only on loopback. One fleet for the
module: each test leaves it as it found it (replicas UP, Redis running).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
from tritonclient.utils import InferenceServerException

from clients import samples
from clients.classify import PipelineClient
from rtinfer import audit
from rtinfer.launch.fleet import Fleet
from rtinfer.launch.gateway import CONFIG_DIR
from rtinfer.launch.server import ROOT

from conftest import require_haproxy, require_model

pytestmark = pytest.mark.timeout(300)

INVALID = ("StatusCode.INVALID_ARGUMENT", "400")
RETRY = ("StatusCode.UNAVAILABLE", "503")
SERVER_TROUBLE = "retry later"  # what a replica says when it refuses UNAVAILABLE (rtinfer.errors)
# the reasons a replica gives when its replay store (nonces, audit contexts) does not answer
STORE_DOWN_REASONS = {"replay_store_unavailable"}


def require_redis():
    from rtinfer.launch.redis_server import RedisUnavailable, redis_binary
    try:
        redis_binary()
    except RedisUnavailable as exc:  # make test installs it first (make redis): a failure, not a skip
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def fleet(keyring_path, signing_key, tmp_path_factory):
    require_model()
    require_haproxy()
    require_redis()
    work = tmp_path_factory.mktemp("fleet")
    with Fleet(2, audit_root=work / "audit", keyring=str(keyring_path), audit_signing_key=str(signing_key[0]),
               workdir=work, progress=lambda msg: print(f"\n{msg}", flush=True)) as f:
        yield f


def client(target, protocol: str, keys, name: str) -> PipelineClient:
    url = target.grpc_url if protocol == "grpc" else target.http_url
    return PipelineClient(url, protocol=protocol, key=keys.key("k1"), key_id="k1", client_id=name,
                          **({"network_timeout": 60.0} if protocol == "http" else {}))


def classify_error(exc: Exception) -> str:
    """What the client was told: replayed / unavailable (the replica's retryable refusal) / failed (any other
    error, a broken connection included)."""
    if isinstance(exc, InferenceServerException):
        status, msg = str(exc.status()), exc.message() or ""
        if status in INVALID and "replay" in msg:
            return "replayed"
        if status in RETRY and SERVER_TROUBLE in msg:
            return "unavailable"
        return f"failed: {status} {msg[:120]}"
    return f"failed: {type(exc).__name__} {str(exc)[:120]}"


def fleet_records(fleet) -> dict[str, list[dict]]:
    """request id -> its records across the fleet, each with the replica directory it was found in."""
    out: dict[str, list[dict]] = {}
    for s in fleet.servers:
        for r in audit.read_records(fleet.audit_dir(s.replica_id)):
            if r.get("request_id"):
                out.setdefault(r["request_id"], []).append({**r, "_dir": s.replica_id})
    return out


def fleet_verify(fleet, signing_key) -> str:
    """``python -m rtinfer.audit verify <fleet root>``: every replica's chains and signed checkpoints, none
    missing, nothing served twice. Its output (the test fails when it does)."""
    proc = subprocess.run([sys.executable, "-m", "rtinfer.audit", "verify", str(fleet.audit_root),
                           "--public-key", str(signing_key[1])], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert all(f"REPLICA {rid}" in proc.stdout for rid in ("r1", "r2")), proc.stdout[-2000:]
    return proc.stdout


def check_interval_bound() -> float:
    """Seconds within which the gateway must mark a dead replica down: 'fall' failed checks 'inter' apart
    (haproxy.cfg), one more interval for the phase of the check, and the check's own timeout."""
    cfg = (CONFIG_DIR / "haproxy.cfg").read_text()
    inter = float(re.search(r"default-server .*\binter (\d+)s", cfg).group(1))
    fall = int(re.search(r"default-server .*\bfall (\d+)", cfg).group(1))
    timeout_check = float(re.search(r"timeout check (\d+)s", cfg).group(1))
    return (fall + 1) * inter + timeout_check


class Load:
    """``clients`` clients through the gateway (half gRPC, half HTTP), each sending freshly sealed photos one
    at a time until stopped or ``max_per_client`` (after a refusal or failure, 50 ms later); every request's
    outcome and times are recorded."""

    def __init__(self, gateway, keys, clients: int = 4, max_per_client: int = 1500):
        self.gateway, self.keys, self.clients, self.max_per_client = gateway, keys, clients, max_per_client
        self.requests: dict[str, dict] = {}  # request id -> {envelope, t0, t1, outcome}
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def client_loop(self, n: int):
        protocol = "grpc" if n % 2 == 0 else "http"
        c = client(self.gateway, protocol, self.keys, f"fleet-{n}")
        image = samples.photo("coffee")
        for i in range(self.max_per_client):
            if self.stop.is_set():
                break
            sealed = c.seal(image)
            rid = f"fleet-{n}-{i}-{uuid.uuid4().hex[:8]}"
            rec = {"envelope": sealed, "client": c.client_id, "t0": time.monotonic(), "t1": None,
                   "outcome": "no answer"}
            with self.lock:
                self.requests[rid] = rec
            try:
                c.infer_envelope(sealed, top_k=1, request_id=rid)
                outcome = "served"
            except Exception as exc:  # noqa: BLE001 - every failure is recorded, judged by the test
                outcome = classify_error(exc)
            with self.lock:
                rec.update(t1=time.monotonic(), outcome=outcome)
            if outcome != "served":
                time.sleep(0.05)  # a client backs off before it seals a new envelope and tries again
        try:
            c.close()
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> "Load":
        self.threads = [threading.Thread(target=self.client_loop, args=(n,), daemon=True)
                        for n in range(self.clients)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(120)

    def count(self, outcome: str = "served", since: float = 0.0) -> int:
        with self.lock:
            return sum(1 for r in self.requests.values() if r["outcome"] == outcome and r["t0"] >= since)

    def wait_for(self, n: int, outcome: str = "served", since: float = 0.0, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count(outcome, since) < n:
            assert time.monotonic() < deadline, f"fewer than {n} {outcome} in {timeout:.0f}s: {self.summary()}"
            time.sleep(0.05)

    def summary(self) -> dict:
        out: dict[str, int] = {}
        with self.lock:
            for r in self.requests.values():
                key = r["outcome"] if not r["outcome"].startswith("failed") else "failed"
                out[key] = out.get(key, 0) + 1
        return out

    def failures(self) -> list[tuple[str, str]]:
        with self.lock:
            return [(rid, r["outcome"]) for rid, r in self.requests.items() if r["outcome"].startswith("failed")]


def check_served_audited_once(load: Load, fleet) -> dict[str, list[dict]]:
    """Every request answered OK has exactly one record across the fleet, 'served'; every other at most one."""
    recs = fleet_records(fleet)
    for rid, r in load.requests.items():
        found = recs.get(rid, [])
        if r["outcome"] == "served":
            assert [x["event"] for x in found] == ["served"], (rid, found)
        else:
            assert len(found) <= 1, (rid, r["outcome"], found)
    return recs


# ------------------------------------------------------------------ replay across replicas

def expect_replayed(c: PipelineClient, sealed: bytes, rid: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        c.infer_envelope(sealed, top_k=1, request_id=rid)
    assert classify_error(info.value) == "replayed", info.value


def only_record(fleet, rid: str) -> dict:
    [rec] = fleet_records(fleet).get(rid, [None])
    assert rec is not None, f"{rid} not audited"
    return rec


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_an_envelope_served_by_one_replica_is_refused_by_the_other(fleet, keys, protocol):
    r1, r2 = fleet.server("r1"), fleet.server("r2")
    gw = fleet.gateway
    a, b, via = (client(s, protocol, keys, f"replay-{protocol}") for s in (r1, r2, gw))
    try:
        # directly: replica r1, then replica r2
        sealed = a.seal(samples.photo("coffee"))
        first, second = f"direct-1-{uuid.uuid4().hex[:8]}", f"direct-2-{uuid.uuid4().hex[:8]}"
        assert a.infer_envelope(sealed, top_k=1, request_id=first).predictions[0].index == 967
        expect_replayed(b, sealed, second)
        assert only_record(fleet, first)["_dir"] == "r1"
        rec = only_record(fleet, second)
        assert (rec["_dir"], rec["event"], rec["reason"]) == ("r2", "rejected", "replayed"), rec

        # through the gateway: r1 out of the gateway (maint), the envelope lands on r2; then the other way
        sealed = via.seal(samples.photo("coffee"))
        first, second = f"gw-1-{uuid.uuid4().hex[:8]}", f"gw-2-{uuid.uuid4().hex[:8]}"
        gw.set_replica_state("r1", "maint")
        try:
            via.infer_envelope(sealed, top_k=1, request_id=first)
        finally:
            gw.set_replica_state("r1", "ready")
        gw.wait_replica("r1", "UP")
        gw.set_replica_state("r2", "maint")
        try:
            expect_replayed(via, sealed, second)
        finally:
            gw.set_replica_state("r2", "ready")
        gw.wait_replica("r2", "UP")
        assert only_record(fleet, first)["_dir"] == "r2"
        rec = only_record(fleet, second)
        assert (rec["_dir"], rec["event"], rec["reason"]) == ("r1", "rejected", "replayed"), rec
    finally:
        for c in (a, b, via):
            c.close()


# ------------------------------------------------------------------ balancing, per-replica visibility

def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def metric(text: str, name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_the_gateway_balances_per_request_and_shows_each_replica(fleet, keys):
    gw = fleet.gateway
    before = gw.server_stats()
    for protocol in ("grpc", "http"):  # one client: one HTTP/2 channel, one HTTP/1.1 keep-alive connection
        c = client(gw, protocol, keys, f"balance-{protocol}")
        for _ in range(6):
            c.classify(samples.photo("coffee"), top_k=1)
        bad = bytearray(c.seal(samples.photo("coffee")))
        bad[-25] ^= 0x55  # tampered: refused by the replica (INVALID_ARGUMENT / 400), audited there
        with pytest.raises(InferenceServerException):
            c.infer_envelope(bytes(bad), top_k=1)
        c.close()
    after = gw.server_stats()
    for backend in ("triton_grpc", "triton_http"):
        per_replica = {rid: int(after[(backend, rid)]["stot"]) - int(before[(backend, rid)]["stot"])
                       for rid in ("r1", "r2")}
        assert sum(per_replica.values()) == 7 and min(per_replica.values()) >= 2, (backend, per_replica)

    # HAProxy's exporter: traffic and answers by class per replica (servers named by replica id)
    text = scrape(f"http://{gw.host}:{gw.metrics_port}/gateway/metrics")
    for rid in ("r1", "r2"):
        assert metric(text, "haproxy_server_http_responses_total", proxy="triton_http", server=rid, code="2xx") > 0
        assert 'haproxy_server_status{proxy="triton_grpc",server="%s"' % rid in text
    assert sum(metric(text, "haproxy_server_http_responses_total", proxy="triton_http", server=rid, code="4xx")
               for rid in ("r1", "r2")) >= 1  # the HTTP refusal, counted at the replica that answered it
    # gRPC refusals come in HTTP 200 (grpc-status): counted per replica by the gateway's policy
    answers = scrape(f"http://{gw.host}:{gw.metrics_port}/gateway/replicas/metrics")
    assert sum(metric(answers, "rtinfer_gateway_grpc_answers_total", replica=rid, grpc_status="INVALID_ARGUMENT")
               for rid in ("r1", "r2")) >= 1, answers
    assert all(metric(answers, "rtinfer_gateway_grpc_answers_total", replica=rid, grpc_status="OK") >= 2
               for rid in ("r1", "r2")), answers

    # Triton's own metrics of each replica through the gateway, /metrics = the first replica
    for rid in ("r1", "r2"):
        direct = scrape(fleet.server(rid).metrics_url)
        through = scrape(gw.replica_metrics_url(rid))
        assert metric(through, "nv_inference_request_success", model="pipeline") == \
            metric(direct, "nv_inference_request_success", model="pipeline") > 0
    assert metric(scrape(gw.metrics_url), "nv_inference_request_success", model="pipeline") == \
        metric(scrape(fleet.server("r1").metrics_url), "nv_inference_request_success", model="pipeline")
    for path in ("/replicas/r3/metrics", "/replicas/r1/../r2/metrics", "/replicas/r1/metrics/x", "/replicas/metrics"):
        with pytest.raises(urllib.error.HTTPError) as info:
            scrape(f"http://{gw.host}:{gw.metrics_port}{path}")
        assert info.value.code == 403, path
    assert "replica=r1" in gw.log_text() and "replica=r2" in gw.log_text()


def test_prometheus_scrapes_each_replica_through_the_gateway(fleet, tmp_path):
    """The scrape config the gateway writes (prometheus-scrape.yml) run by a real Prometheus: HAProxy's
    exporter, the gRPC answers per replica, and each replica's Triton metrics labelled with its id."""
    import json

    from rtinfer.launch.process import free_port
    from rtinfer.launch.prometheus import binary
    gw = fleet.gateway
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text("global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
                   + (gw.workdir / "prometheus-scrape.yml").read_text())
    subprocess.run([binary("promtool"), "check", "config", str(cfg)], check=True, capture_output=True, timeout=60)
    port = free_port()
    proc = subprocess.Popen([binary(), f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    want = {("gateway", "127.0.0.1:%d" % gw.metrics_port), ("gateway_replicas", "127.0.0.1:%d" % gw.metrics_port),
            ("triton", "r1"), ("triton", "r2")}
    seen, deadline = set(), time.monotonic() + 60
    try:
        while seen != want and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                body = json.loads(scrape(f"http://127.0.0.1:{port}/api/v1/query?query=up%3D%3D1"))
                seen = {(r["metric"]["job"], r["metric"]["instance"]) for r in body["data"]["result"]}
                per_replica = json.loads(scrape(f"http://127.0.0.1:{port}/api/v1/query?query="
                                                "nv_inference_request_success%7Bmodel%3D%22pipeline%22%7D"))
            except (OSError, ValueError):
                continue
    finally:
        proc.terminate()
        proc.wait(30)
    assert seen == want, seen
    assert {r["metric"].get("replica") for r in per_replica["data"]["result"]} == {"r1", "r2"}, per_replica


# ------------------------------------------------------------------ Redis down

@pytest.mark.slow
def test_redis_down_under_load_refuses_unavailable_audited_and_recovers(fleet, keys):
    redis = fleet.redis
    with Load(fleet.gateway, keys) as load:
        load.wait_for(12)
        redis.stop()  # SIGTERM: Redis writes its AOF and exits; the replicas cannot reach it
        down = time.monotonic()
        try:
            load.wait_for(12, "unavailable", since=down, timeout=30)
            time.sleep(max(0.0, down + 2.0 - time.monotonic()))  # an outage of 2 s at least
        finally:
            up0 = time.monotonic()
            redis.start()
        up = time.monotonic()
        load.wait_for(12, "served", since=up, timeout=60)
    counts = load.summary()
    assert not load.failures(), load.failures()[:5]
    while_down = [(rid, r["outcome"]) for rid, r in load.requests.items() if r["t0"] >= down and r["t1"] <= up0]
    assert while_down and all(o == "unavailable" for _, o in while_down), \
        [x for x in while_down if x[1] != "unavailable"]
    recs = check_served_audited_once(load, fleet)
    refused = [rid for rid, r in load.requests.items() if r["outcome"] == "unavailable"]
    for rid in refused:  # refused, and audited as such where it was refused
        [rec] = recs.get(rid, [None])
        assert rec is not None and rec["event"] == "rejected" and rec["reason"] in STORE_DOWN_REASONS, (rid, rec)
    # none was served unchecked: every served envelope's nonce is in Redis (it outlived the restart), so
    # each one sent again, to whichever replica, is refused as a replay
    served = [r for r in load.requests.values() if r["outcome"] == "served"]
    for name in {r["client"] for r in served}:
        c = client(fleet.gateway, "grpc", keys, name)  # the client id its envelopes were sealed for
        try:
            for i, r in enumerate(x for x in served if x["client"] == name):
                expect_replayed(c, r["envelope"], f"again-{name}-{i}-{uuid.uuid4().hex[:8]}")
        finally:
            c.close()
    print(f"\nFLEET redis down: {counts}, refused while down {len(refused)}, served envelopes replayed "
          f"and refused {len(served)}, outage {up0 - down:.1f} s")


# ------------------------------------------------------------------ replica crash

@pytest.mark.slow
def test_replica_crash_under_load_loses_nothing_and_replays_nothing(fleet, keys, signing_key):
    gw, victim = fleet.gateway, fleet.server("r1")
    bound = check_interval_bound()
    with Load(gw, keys) as load:
        load.wait_for(40)
        deadline = time.monotonic() + 10
        while gw.in_flight("r1") < 2 and time.monotonic() < deadline:  # kill it with requests inside
            time.sleep(0.002)
        killed = time.monotonic()
        victim.kill()  # SIGKILL to tritonserver and its stubs, requests in flight on it
        gw.wait_replica("r1", "DOWN", timeout=bound + 10)
        down = time.monotonic()
        took = down - killed  # an upper bound: kill() waits until the stubs are gone too
        load.wait_for(20, since=down)  # served by r2 alone
    counts = load.summary()
    assert took <= bound, f"the gateway took {took:.1f} s to mark the dead replica down (bound {bound:.0f} s)"
    recs = check_served_audited_once(load, fleet)
    outcomes = {r["outcome"] for r in load.requests.values()}
    assert "replayed" not in outcomes, "a request that reached the dead replica was re-sent to the other"
    failed = load.failures()
    assert all(load.requests[rid]["t0"] < down for rid, _ in failed), failed  # only those caught by the crash
    assert len(failed) <= load.clients, failed  # at most one in flight per client at the kill
    after = [rid for rid, r in load.requests.items() if r["t0"] >= down]
    assert after and all(recs[rid][0]["_dir"] == "r2" for rid in after)

    restarted = fleet.restart("r1", drain=False)  # same ports, audit directory and replica id
    c = client(gw, "grpc", keys, "after-crash")
    try:
        ids = [c.classify(samples.photo("coffee"), top_k=1).request_id for _ in range(6)]
    finally:
        c.close()
    recs = fleet_records(fleet)
    assert {recs[rid][0]["_dir"] for rid in ids} == {"r1", "r2"}  # r1 serves again, its chain continued
    out = fleet_verify(fleet, signing_key)
    print(f"\nFLEET crash: {counts}, marked down in {took:.1f} s after the kill (bound {bound:.0f} s), "
          f"failed in flight {len(failed)}, restart {restarted}\n{out[-600:]}")


# ------------------------------------------------------------------ rolling restart

@pytest.mark.slow
def test_rolling_restart_under_load_fails_no_request(fleet, keys, signing_key):
    gw = fleet.gateway
    with Load(gw, keys) as load:
        load.wait_for(12)
        steps, back_up = [], {}
        for rid in ("r1", "r2"):
            steps.append({"replica": rid, **fleet.restart(rid)})  # drain, stop, start, ready, wait UP
            back_up[rid] = time.monotonic()
        load.wait_for(16, since=back_up["r2"])
    counts = load.summary()
    assert not load.failures(), load.failures()[:5]
    assert counts == {"served": len(load.requests)}, counts
    recs = check_served_audited_once(load, fleet)
    for rid, t in back_up.items():  # each replica serves again after its restart
        assert any(recs[q][0]["_dir"] == rid for q, r in load.requests.items() if r["t0"] > t), rid
    out = fleet_verify(fleet, signing_key)
    print(f"\nFLEET rolling restart: {counts}, steps {steps}\n{out[-400:]}")


# ------------------------------------------------------------------ what `make serve REPLICAS=2` runs

def children_of(pid: int) -> list[int]:
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return out


@pytest.mark.slow
def test_serve_command_with_two_replicas_rolls_on_sighup_and_stops_on_sigterm(keyring_path, keys, tmp_path):
    """`python -m rtinfer.launch.gateway --replicas 2` (make serve REPLICAS=2): Redis and two replicas behind the
    gateway on loopback, served on both protocols; SIGHUP restarts the replicas one by one; SIGTERM stops all four."""
    require_model()
    require_haproxy()
    require_redis()
    from rtinfer.launch.process import free_port
    ports = {name: free_port() for name in ("http", "grpc", "metrics")}
    cmd = [sys.executable, "-m", "rtinfer.launch.gateway", "--replicas", "2", "--model", "pipeline",
           "--keyring", str(keyring_path), "--audit-dir", str(tmp_path / "audit"),
           *(x for name, port in ports.items() for x in (f"--{name}-port", str(port)))]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read_until(fragment: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if fragment in line:
                return line
        raise AssertionError(f"no {fragment!r} in the output:\n{''.join(lines)[-3000:]}")

    try:
        read_until("gateway ready")
        for rid in ("r1", "r2"):
            assert re.search(rf"replica {rid} behind it on loopback: HTTP 127\.0\.0\.1:\d+\s+gRPC 127\.0\.0\.1:\d+",
                             read_until(f"replica {rid} behind it"))
        assert "replay store redis://" in read_until("kill -HUP")
        for protocol in ("grpc", "http"):
            c = client(type("T", (), {"grpc_url": f"127.0.0.1:{ports['grpc']}",
                                      "http_url": f"127.0.0.1:{ports['http']}"})(), protocol, keys, "serve")
            assert c.classify(samples.photo("coffee"), top_k=1).predictions[0].index == 967
            c.close()
        children = children_of(proc.pid)
        assert len(children) == 4, children  # redis-server, two tritonservers, haproxy
        proc.send_signal(signal.SIGHUP)
        read_until("rolling restart: r1 back UP")
        read_until("rolling restart: r2 back UP")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
        assert not any(os.path.exists(f"/proc/{pid}") for pid in children)  # stopped and reaped
        assert sorted(p.name for p in (tmp_path / "audit").iterdir() if p.is_dir()) == ["r1", "r2"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
