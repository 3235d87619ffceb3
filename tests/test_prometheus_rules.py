"""deploy/prometheus/: the config and rules load, every alert is unit-tested with promtool on
synthetic series, and the rules read only metrics that the stages export (rtinfer.metrics)."""
from __future__ import annotations

import re
import subprocess

import pytest

from rtinfer import metrics
from rtinfer.launch.server import ROOT

from helpers import promtool

PROM = ROOT / "deploy" / "prometheus"
RULES = sorted((PROM / "rules").glob("*.yml"))
TESTS = sorted((PROM / "tests").glob("*.test.yml"))


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=PROM, capture_output=True, text=True, timeout=120)


def test_config_and_rules_load():
    proc = run("check", "config", "prometheus.yml")  # checks the rule files it names, too
    assert proc.returncode == 0, proc.stdout + proc.stderr
    named = set(re.findall(r"^\s+- (rules/\S+\.yml)$", (PROM / "prometheus.yml").read_text(), re.M))
    assert named == {str(r.relative_to(PROM)) for r in RULES}


@pytest.mark.parametrize("test_file", TESTS, ids=lambda p: p.name)
def test_promtool_rule_tests_pass(test_file):
    proc = run("test", "rules", str(test_file.relative_to(PROM)))
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def test_every_alert_fires_in_a_promtool_test():
    alerts = {a for r in RULES for a in re.findall(r"^\s+- alert: (\w+)$", r.read_text(), re.M)}
    firing = set()
    for t in TESTS:  # an alert test whose expected alerts are not empty
        for block in re.split(r"\n\s+- (?=eval_time|\{eval_time)", t.read_text()):
            name = re.search(r"alertname: (\w+)", block)
            if name and "exp_labels" in block:
                firing.add(name[1])
    assert len(alerts) >= 15 and alerts <= firing, sorted(alerts - firing)


def test_rules_read_only_exported_metrics():
    exported = {metrics.name(s) for s in metrics.SPECS}
    text = "\n".join(r.read_text() for r in RULES)
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"(?<![:\w])(rtinfer_[a-z_]+)", text)}
    assert used and used <= exported, sorted(used - exported)
    for name in re.findall(r"\b(\w+:\w+:\w+)\b", text):  # recorded series are recorded somewhere
        assert re.search(rf"- record: {re.escape(name)}$", text, re.M), name
