"""`make observe` on a small scale: the real server, gateway, Prometheus (rules time-compressed) and
Locust. Clean traffic raises no alert; the injected attack raises each of its alerts; every series the
rules and the dashboard read from Triton, HAProxy and the stages exists on the real servers."""
from __future__ import annotations

import json
import re
import subprocess

from rtinfer.launch import observe, prometheus
from rtinfer.launch.server import ROOT

from conftest import require_haproxy, require_model
from helpers import promtool


def test_make_observe_attack_raises_its_alerts_and_clean_traffic_none(tmp_path):
    require_model()
    require_haproxy()
    promtool()
    out = tmp_path / "observe"
    # -o engines-quick: the model is there (require_model); only the observe recipe is under test
    proc = subprocess.run(["make", "--no-print-directory", "-o", "engines-quick", "observe", f"OBSERVE_OUT={out}",
                           "OBSERVE_ARGS=--clean-s 20 --surge-s 0 --attack-s 30"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    result = json.loads((out / "alerts.json").read_text())
    assert result["fired_when_clean"] == [] and result["missing"] == [], text[-4000:]
    fired = {(f["alert"], tuple(sorted(f["labels"].items()))) for f in result["fired"]}
    assert fired == {("RtinferAuthFailures", (("client", "other"),)),  # mallory is no admitted client
                     ("RtinferReplayAttempts", (("client", "alice"),)),
                     ("RtinferRetiredKeyInUse", (("client", "alice"),)),
                     ("RtinferGatewayRefusals", (("proxy", "http"),))}, result["fired"]
    assert all(f["phase"] == "attack" for f in result["fired"])
    assert result["clean_load_exit"] == 0  # Locust's clean users saw no failure
    assert "RtinferReplayAttempts{client=alice}" in proc.stdout
    assert (out / "observe.png").stat().st_size > 20_000

    # every raw series the rules and the dashboard read was there (recorded ones are made from them)
    rules = "\n".join(p.read_text() for p in (ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
    recorded = set(re.findall(r"- record: (\S+)", rules))
    exprs = [t["expr"] for p in json.loads(observe.DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]
    exprs += prometheus.rule_expressions(rules)
    read = set().union(*(prometheus.metric_names(e) for e in exprs)) - recorded - {"ALERTS"}
    read = {re.sub(r"_(bucket|sum|count)$", "", n) if n.startswith("rtinfer_") else n for n in read}
    present = set(result["series"]) | {re.sub(r"_(bucket|sum|count)$", "", n) for n in result["series"]}
    assert read - present == set(), sorted(read - present)
