"""`make observe`: the service, a real Prometheus over it, clean load, then injected abuse; which alerts fired.

Starts Triton on loopback with the gateway in front (inference key required), a Prometheus
scraping both with the rules of deploy/prometheus/ time-compressed (``rtinfer.launch.prometheus``:
every window and ``for:`` divided by ``--compress``, the intervals too), and runs phases:

  clean   Locust users of client ``alice`` through the gateway (both protocols): no alert may fire;
  surge   (when the clean phase is long enough to give alice a baseline) more alice users, all
          valid: only the per-client anomaly rule can see it;
  attack  beside the clean load: forged envelopes, alice's captured envelope replayed, a retired
          key, wrong API keys and a composing model asked for at the gateway.

Prints the alerts that fired (first firing time, phase), writes ``alerts.json`` and ``observe.png``
(the dashboard's key panels, queried from Prometheus, drawn with matplotlib) to ``--out``, and
exits 1 when an expected alert did not fire or any fired during the clean phase.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from rtinfer import checkpoint, envelope, keyring
from rtinfer.launch.gateway import Gateway
from rtinfer.launch.prometheus import Prometheus
from rtinfer.launch.server import ROOT, TritonServer

DASHBOARD = ROOT / "deploy" / "grafana" / "rtinfer-dashboard.json"
KEY_PANELS = ("Requests by client", "Refusals by reason", "Gateway refusals", "Stage steps p99",
              "Request latency (preprocess start to served record)", "Audit records written", "Firing alerts",
              "Client request rate, spreads from its own last hour")
EXPECTED = {"attack": {"RtinferAuthFailures", "RtinferReplayAttempts", "RtinferRetiredKeyInUse",
                       "RtinferGatewayRefusals"},
            "surge": {"RtinferClientRateAnomaly"}}
CLIENT = "alice"
# The anomaly rules need 200 evaluations of a client's rate in the window ending 10 minutes back:
# 10 min + 200 x 15 s = 3600 s of clean traffic, compressed.
BASELINE_S = 3600.0


class Attacker:
    """Bad traffic through the gateway at a fixed rate per kind, from threads (small and bounded)."""

    def __init__(self, gateway: Gateway, keys: keyring.Keyring, api_key: str, photo: bytes):
        import tritonclient.http as httpclient
        self.http, self.gw, self.api_key, self.photo = httpclient, gateway, api_key, photo
        self.k1, self.old = keys.entries()["k1"].key, keys.entries()["old"].key
        self.sent: dict[str, int] = {}
        self.captured = envelope.seal(photo, self.k1, key_id="k1", client_id=CLIENT, pipeline="pipeline")
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _infer(self, client, env: bytes, cid: str, api_key: str | None = None) -> None:
        inp = self.http.InferInput("ENVELOPE", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[env]], dtype=np.object_))
        try:
            client.infer("pipeline", [inp], parameters={"client_id": cid},
                         headers={"x-api-key": self.api_key if api_key is None else api_key})
        except Exception:  # noqa: BLE001 - refusals are the point
            pass

    def forged(self, client):  # tampered / wrongly keyed envelopes, claiming a made-up client
        self._infer(client, envelope.seal(self.photo, os.urandom(32), key_id="k1", client_id="mallory",
                                          pipeline="pipeline"), "mallory")

    def replay(self, client):  # alice's envelope, captured once, sent again and again
        self._infer(client, self.captured, CLIENT)

    def retired(self, client):  # alice still sealing with the key retired at the last rotation
        self._infer(client, envelope.seal(self.photo, self.old, key_id="old", client_id=CLIENT,
                                          pipeline="pipeline"), CLIENT)

    def gateway(self, client):  # wrong API key, and a composing model
        self._infer(client, b"x", CLIENT, api_key="not-the-key")
        try:
            urllib.request.urlopen(f"http://{self.gw.http_url}/v2/models/preprocess/config", timeout=5)
        except (urllib.error.URLError, OSError):
            pass

    def start(self, rates: dict[str, float]) -> None:
        for kind, per_s in rates.items():
            t = threading.Thread(target=self._loop, args=(kind, per_s), daemon=True)
            t.start()
            self._threads.append(t)

    def _loop(self, kind: str, per_s: float) -> None:
        client = self.http.InferenceServerClient(self.gw.http_url, network_timeout=30)
        step = getattr(self, kind)
        while not self._stop.wait(1.0 / per_s):
            step(client)
            self.sent[kind] = self.sent.get(kind, 0) + 1
        client.close()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


class AlertLog:
    """Polls Prometheus' alerts and keeps, per alert and labels, when it first fired and in which phase."""

    def __init__(self, prom: Prometheus):
        self.prom, self.phase, self.t0 = prom, "clean", time.time()
        self.fired: dict[tuple, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self) -> "AlertLog":
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            try:
                alerts = self.prom.alerts()
            except OSError:
                continue
            for a in alerts:
                if a["state"] != "firing":
                    continue
                labels = {k: v for k, v in a["labels"].items() if k not in ("severity", "kind")}
                key = tuple(sorted(labels.items()))
                if key not in self.fired:
                    self.fired[key] = {"alert": labels.pop("alertname"), "labels": labels, "phase": self.phase,
                                       "first_firing_s": round(time.time() - self.t0, 1),
                                       "summary": a.get("annotations", {}).get("summary", "")}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _locust(out: Path, gw: Gateway, ring: Path, key_file: Path, users: int, seconds: float, wait: tuple, tag: str):
    cmd = [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless", "-u", str(users),
           "-r", str(users), "-t", f"{int(seconds)}s", "--stop-timeout", "5", "--only-summary",
           "--triton-grpc", gw.grpc_url, "--triton-http", gw.http_url, "--keyring", str(ring),
           "--client-id", CLIENT, "--triton-api-key-file", str(key_file), "--wait-min", str(wait[0]),
           "--wait-max", str(wait[1]), "GrpcPipelineUser", "HttpPipelineUser"]
    log = open(out / f"locust-{tag}.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def plot(prom: Prometheus, start: float, end: float, marks: dict[str, float], path: Path) -> Path:
    """The dashboard's key panels over the run, from Prometheus' query API."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"] if p.get("targets")}
    rate_interval = f"{max(4, int(4 * 15 / prom.factor))}s"
    fig, axes = plt.subplots(4, 2, figsize=(15, 14))
    step = max(1.0, (end - start) / 300)
    for ax, title in zip(axes.flat, KEY_PANELS):
        for target in panels[title]["targets"]:
            expr = target["expr"].replace("$__rate_interval", rate_interval)
            for series in prom.query_range(expr, start, end, step):
                t = np.array([float(v[0]) for v in series["values"]]) - start
                y = np.array([float(v[1]) for v in series["values"]])
                label = target.get("legendFormat", "")
                for k, v in series["metric"].items():
                    label = label.replace("{{" + k + "}}", v)
                ax.plot(t, y, label=label[:40] or expr[:40])
        for name, at in marks.items():
            ax.axvline(at - start, color="grey", ls=":", lw=1)
            ax.text(at - start, 1.0, f" {name}", transform=ax.get_xaxis_transform(), fontsize=7, va="top", color="grey")
        ax.set_title(f"{title} ({panels[title]['fieldConfig']['defaults'].get('unit', '')})", fontsize=9)
        ax.set_xlabel("seconds since start", fontsize=8)
        ax.tick_params(labelsize=7)
        if any(not line.get_label().startswith("_") for line in ax.lines):
            ax.legend(fontsize=6, loc="upper left")
    fig.suptitle(f"rtinfer under clean load and injected abuse (Prometheus rules time-compressed x{prom.factor:g})")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run(out: Path, *, clean_s: float, surge_s: float, attack_s: float, compress: float, users: int,
        wait: tuple[float, float], photo: bytes, model_repository: Path = ROOT / "model_repository") -> dict:
    """``photo``: the image bytes (JPEG/PNG) the attack phase seals and sends."""
    out.mkdir(parents=True, exist_ok=True)
    ring = keyring.write_new(out / "keyring.json", key_ids=("k1", "old"), clients={"k1": [CLIENT], "old": [CLIENT]})
    keyring.retire_key(ring, "old", grace_s=0)  # rotated away: envelopes sealed with it are refused
    keys = keyring.Keyring.load(ring)
    signing = out / "audit-signing.pem"
    if not signing.exists():
        checkpoint.keygen(signing)
    api_key = os.urandom(12).hex()
    key_file = out / "api-key"
    key_file.write_text(api_key)
    key_file.chmod(0o600)
    if surge_s and clean_s < BASELINE_S / compress + 20:
        print(f"surge skipped: the clean phase must give alice a baseline first "
              f"({BASELINE_S / compress + 20:.0f} s at --compress {compress:g})", flush=True)
        surge_s = 0
    server = TritonServer(model_repository, keyring=str(ring), audit_dir=str(out / "audit"),
                          audit_signing_key=str(signing), api_key=api_key, workdir=out / "triton")
    with server:
        gateway = Gateway.in_front_of(server, api_keys=[api_key], workdir=out / "gateway")
        with gateway:
            metrics = f"127.0.0.1:{gateway.metrics_port}"
            with Prometheus(out / "prometheus", triton_metrics=metrics, gateway_metrics=metrics,
                            factor=compress) as prom:
                print(f"service: gateway {gateway.http_url} (HTTP) {gateway.grpc_url} (gRPC), "
                      f"Prometheus {prom.url} (rules x{compress:g} faster)", flush=True)
                log = AlertLog(prom).start()
                start = time.time()
                total = clean_s + surge_s + attack_s
                clean = _locust(out, gateway, ring, key_file, users, total, wait, "clean")
                marks = {"clean": start}
                time.sleep(clean_s)
                if surge_s:
                    log.phase, marks["surge"] = "surge", time.time()
                    surge = _locust(out, gateway, ring, key_file, 3 * users, surge_s, (0, 0.1), "surge")
                    time.sleep(surge_s)
                    surge.wait(30)
                log.phase, marks["attack"] = "attack", time.time()
                attacker = Attacker(gateway, keys, api_key, photo)
                attacker.start({"forged": 2, "replay": 1, "retired": 1, "gateway": 1})
                time.sleep(attack_s)
                attacker.stop()
                time.sleep(2 * 15 / compress)  # the last evaluations
                log.stop()
                clean.wait(60)
                end = time.time()
                result = {"fired": sorted(log.fired.values(), key=lambda f: f["first_firing_s"]),
                          "sent": attacker.sent, "phases": {k: round(v - start, 1) for k, v in marks.items()},
                          "compress": compress, "clean_load_exit": clean.returncode}
                result["missing"] = sorted(set().union(*(EXPECTED[p] for p in marks if p in EXPECTED))
                                           - {f["alert"] for f in result["fired"] if f["phase"] != "clean"})
                result["fired_when_clean"] = [f for f in result["fired"] if f["phase"] == "clean"]
                every = prom.api("series", **{"match[]": '{__name__=~".+"}'})
                result["series"] = sorted({s["__name__"] for s in every})
                plot(prom, start, end, marks, out / "observe.png")
    (out / "alerts.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def report(result: dict) -> str:
    lines = [f"phases (s from start): {result['phases']}; bad requests sent: {result['sent']}", "alerts that fired:"]
    for f in result["fired"]:
        labels = ",".join(f"{k}={v}" for k, v in f["labels"].items())
        lines.append(f"  {f['first_firing_s']:7.1f} s  [{f['phase']:6s}] {f['alert']}{{{labels}}}  {f['summary']}")
    if not result["fired"]:
        lines.append("  (none)")
    lines.append(f"expected but not fired: {result['missing'] or 'none'}; "
                 f"fired during clean traffic: {[f['alert'] for f in result['fired_when_clean']] or 'none'}")
    return "\n".join(lines)


def coffee_photo() -> bytes:
    """scikit-image's coffee photo as JPEG bytes (the default ``--photo``)."""
    import io

    from PIL import Image
    from skimage import data
    buf = io.BytesIO()
    Image.fromarray(data.coffee()).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rtinfer.launch.observe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "build" / "observe"))
    p.add_argument("--clean-s", type=float, default=270.0, help="clean phase, seconds")
    p.add_argument("--surge-s", type=float, default=40.0, help="alice's surge (0: none)")
    p.add_argument("--attack-s", type=float, default=40.0)
    p.add_argument("--compress", type=float, default=15.0, help="rule durations and intervals divided by this")
    p.add_argument("--users", type=int, default=2, help="Locust users of the clean load")
    p.add_argument("--wait", type=float, nargs=2, default=(0.2, 0.6), metavar=("MIN", "MAX"),
                   help="seconds between a clean user's requests")
    p.add_argument("--photo", type=Path,
                   help="image (JPEG/PNG) the attack phase sends (default: scikit-image's coffee)")
    args = p.parse_args(argv)
    result = run(Path(args.out), clean_s=args.clean_s, surge_s=args.surge_s, attack_s=args.attack_s,
                 compress=args.compress, users=args.users, wait=tuple(args.wait),
                 photo=args.photo.read_bytes() if args.photo else coffee_photo())
    print(report(result))
    print(f"wrote {Path(args.out) / 'alerts.json'} and {Path(args.out) / 'observe.png'}")
    return 1 if result["missing"] or result["fired_when_clean"] else 0


if __name__ == "__main__":
    sys.exit(main())
