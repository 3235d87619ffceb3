"""deploy/grafana/: the dashboard is a valid Grafana JSON model whose queries read only series that
exist (stage metrics, recorded series, Triton's and HAProxy's metrics seen on real servers)."""
from __future__ import annotations

import itertools
import json
import re

from rtinfer import metrics
from rtinfer.launch import prometheus
from rtinfer.launch.observe import KEY_PANELS
from rtinfer.launch.server import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "rtinfer-dashboard.json"
RULES = "\n".join(p.read_text() for p in (ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
# Triton 2.51's and HAProxy 2.6's metrics the dashboard reads (tests/test_observe.py finds them on real servers)
EXTERNAL = {"nv_inference_compute_infer_duration_us", "nv_inference_request_success", "ALERTS"}


def panels(dash):
    return [p for p in dash["panels"] if p["type"] != "row"]


def known_series() -> set[str]:
    exported = {metrics.name(s) for s in metrics.SPECS}
    exported |= {f"{n}_{suffix}" for n in exported for suffix in ("bucket", "sum", "count")}
    return exported | set(re.findall(r"- record: (\S+)", RULES)) | EXTERNAL


def test_dashboard_is_a_grafana_json_model():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    boxes = []
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0 and g["y"] >= 0, p["title"]
        boxes.append((g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"], p["title"]))
    for a, b in itertools.combinations(boxes, 2):  # Grafana would push overlapping panels around
        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a[4], b[4])
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for p in panels(dash):
        assert p["type"] in {"timeseries", "stat", "bargauge", "table", "heatmap"}, p["type"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip(), p["title"]


def test_panels_read_only_series_that_exist():
    known, unknown = known_series(), {}
    dash = json.loads(DASHBOARD.read_text())
    for p in panels(dash):
        for t in p["targets"]:
            for name in prometheus.metric_names(t["expr"]) - known:
                unknown.setdefault(p["title"], []).append(name)
    assert not unknown, unknown
    # the dashboard shows what the issue asks for
    text = DASHBOARD.read_text()
    for series in ("rtinfer_decrypt_seconds", "rtinfer_decode_seconds", "rtinfer_audit_write_seconds",
                   "reason:rtinfer_refusals:rate2m", "model:nv_inference_batch_size:mean2m",
                   "rtinfer_audit_records_total", "rtinfer_audit_checkpoint_lag_records",
                   "client:rtinfer_requests:rate2m",
                   "proxy:haproxy_refusals:rate2m", "client:rtinfer_requests:zscore"):
        assert series in text, series
    assert set(KEY_PANELS) <= {p["title"] for p in panels(dash)}


def test_metric_names_of_promql():
    assert prometheus.metric_names(
        'sum by (le, stage) (rate(rtinfer_decode_seconds_bucket{stage="pre",le=~"1|2"}[5m] offset 1h)) '
        '/ on(stage) group_left x:y:z and vector(0.4) > bool 2') == {"rtinfer_decode_seconds_bucket", "x:y:z"}
    grafana = 'histogram_quantile(0.99, sum by (le) (rate(a_bucket[$__rate_interval])))'
    assert prometheus.metric_names(grafana) == {"a_bucket"}


def test_compressed_rules_keep_their_meaning_faster():
    text = "expr: rate(x[2m]) > 1 and avg_over_time(client:x:rate2m[1h] offset 10m)\nfor: 5m\nsummary: p99_5m"
    assert prometheus.compress(text, 15) == (
        "expr: rate(x[8s]) > 1 and avg_over_time(client:x:rate2m[240s] offset 40s)\nfor: 20s\nsummary: p99_5m")
    assert prometheus.compress("for: 1m", 40) == "for: 1500ms"


def test_rule_expressions_of_a_rule_file():
    text = ("rules:\n  - record: a:b:c\n    expr: sum(x)\n"
            "  - alert: A\n    expr: |\n      y > 1\n        and z\n    for: 1m\n")
    assert prometheus.rule_expressions(text) == ["sum(x)", "y > 1 and z"]
