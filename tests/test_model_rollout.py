"""Model rollout across a fleet (issue 21, 4): each replica exports the sha256 of the classifier files it
loaded (rtinfer_model_info, here from the files; through a real server in test_replay_redis.py), and the
alert that compares them across replicas is promtool-tested in deploy/prometheus/tests/fleet.test.yml."""
from __future__ import annotations

import hashlib
import json

from rtinfer import metrics
from rtinfer.stage_config import installed_classifiers


class Family:
    """pb_utils.MetricFamily's shape: the gauges set, by labels."""
    GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"
    values: dict = {}

    def __init__(self, name, description, kind):
        self.name = name

    def Metric(self, labels, **_):  # Triton's name
        family = self

        class M:
            def set(self, v):
                Family.values[(family.name, tuple(sorted(labels.items())))] = v
        return M()


def test_the_digest_is_of_the_file_on_disk_not_the_manifest(tmp_path):
    d = tmp_path / "classifier_onnx" / "1"
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"weights v2")
    (d / "model.portable.onnx").write_bytes(b"portable")
    (d / "manifest.json").write_text(json.dumps({"artifact": "model.onnx", "sha256": "0" * 64}))  # stale
    got = installed_classifiers("pipeline=classifier_onnx,pipeline_onnx=classifier_onnx/model.portable.onnx,"
                                "a=classifier_onnx,b=classifier_gone,c=classifier_onnx/absent.onnx", tmp_path)
    assert got == [("classifier_onnx", "model.onnx", hashlib.sha256(b"weights v2").hexdigest()),
                   ("classifier_onnx", "model.portable.onnx", hashlib.sha256(b"portable").hexdigest()),
                   ("classifier_gone", "unknown", "missing"),
                   ("classifier_onnx", "absent.onnx", "missing")]


def test_the_stage_exports_one_series_per_file():
    Family.values = {}
    exporter = metrics.Exporter(Family, "postprocess", metrics.ClientLabels())
    exporter.models([("classifier_onnx", "model.onnx", "ab" * 32)])
    assert Family.values == {("rtinfer_model_info", (("file", "model.onnx"), ("model", "classifier_onnx"),
                                                     ("sha256", "ab" * 32), ("stage", "postprocess"))): 1.0}
