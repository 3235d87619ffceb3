"""A real Prometheus on loopback over deploy/prometheus/: its config for given targets, a time-compressed
copy of the rules, the query API, and the metric names a PromQL expression reads.

``make observe`` and its test cannot wait hours for a one-hour baseline or a five-minute ``for:``;
``compressed_rules`` divides every duration of the rule files by one factor and the launcher
divides the scrape and evaluation intervals by the same factor, so every window still holds
the same number of samples and every rule means the same thing, only faster. Thresholds are
rates per second or per minute and stay as they are.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from rtinfer.launch.process import die_with_parent, free_port, stop_process
from rtinfer.launch.server import ROOT

CONFIG_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = ("recording.yml", "alerts.yml", "anomaly.yml")
BASE_INTERVAL_S = 15  # prometheus.yml's scrape and evaluation interval
_DURATION = re.compile(r"(?<![\w$])(\d+)([smhd])\b")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_FUNCTIONS_AND_KEYWORDS = {"by", "without", "and", "or", "unless", "on", "ignoring", "group_left", "group_right",
                           "offset", "bool", "inf", "nan"}


class PrometheusUnavailable(RuntimeError):
    """No usable prometheus binary on this host."""


def binary(name: str = "prometheus") -> str:
    for candidate in (shutil.which(name), f"/usr/bin/{name}", f"/usr/local/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise PrometheusUnavailable(f"{name} is not installed: run `make prometheus` (apt-get install prometheus as root)")


def _seconds_text(seconds: float) -> str:
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def compress(text: str, factor: float) -> str:
    """Every duration (``5m``, ``[1h]``, ``for: 2m``, ``offset 10m``) of a rule file divided by ``factor``."""
    return _DURATION.sub(lambda m: _seconds_text(int(m[1]) * _UNITS[m[2]] / factor), text)


def compressed_rules(target: Path, factor: float) -> list[Path]:
    target.mkdir(parents=True, exist_ok=True)
    out = []
    for name in RULE_FILES:
        text = (CONFIG_DIR / "rules" / name).read_text()
        (target / name).write_text(compress(text, factor) if factor != 1 else text)
        out.append(target / name)
    return out


def metric_names(expr: str) -> set[str]:
    """The metric (and recorded series) names a PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values)
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(\s*\()?", expr):
        if not m[2] and m[1] not in _FUNCTIONS_AND_KEYWORDS:
            names.add(m[1])
    return names


def rule_expressions(text: str) -> list[str]:
    """The ``expr:`` of every rule in a rule file's text (one line, or a ``|`` block)."""
    out, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr: (.*)$", line)
        if not m:
            continue
        if m[2].strip() != "|":
            out.append(m[2])
            continue
        block = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= len(m[1]):
                break
            block.append(nxt.strip())
        out.append(" ".join(block))
    return out


class Prometheus:
    """A running Prometheus scraping Triton's and the gateway's metrics; a context manager."""

    def __init__(self, workdir: Path, *, triton_metrics: str, gateway_metrics: str | None = None,
                 factor: float = 1.0, port: int = 0):
        self.workdir = Path(workdir).resolve()  # the config names its rule files by absolute path
        self.factor = factor
        self.port = port or free_port()
        self.interval = _seconds_text(BASE_INTERVAL_S / factor)
        self.targets = {"triton": ("/metrics", triton_metrics)}
        if gateway_metrics:
            self.targets["gateway"] = ("/gateway/metrics", gateway_metrics)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        rules = compressed_rules(self.workdir / "rules", self.factor)
        lines = ["global:", f"  scrape_interval: {self.interval}", f"  evaluation_interval: {self.interval}",
                 "rule_files:", *[f"  - {r}" for r in rules], "scrape_configs:"]
        for job, (path, hostport) in self.targets.items():
            lines += [f"  - job_name: {job}", f"    metrics_path: {path}",
                      f"    scrape_timeout: {self.interval}", "    static_configs:",
                      f"      - targets: [\"{hostport}\"]"]
        config = self.workdir / "prometheus.yml"
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self, timeout: float = 60.0) -> "Prometheus":
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        log = open(self.workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary(), f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    ready = resp.status == 200
            except OSError:
                ready = False
            if ready:  # a rule file that matches nothing is no error to Prometheus: check they loaded
                groups = {g["name"] for g in self.api("rules")["groups"]}
                if len(groups) != len(RULE_FILES):
                    self.stop()
                    raise RuntimeError(f"prometheus loaded rule groups {sorted(groups)}, not one per {RULE_FILES}")
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"prometheus not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.workdir / "prometheus.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def api(self, path: str, **params) -> dict | list:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def alerts(self) -> list[dict]:
        """Alerts now pending or firing: [{labels, state, activeAt, value}, ...]."""
        return self.api("alerts")["alerts"]

    def stop(self, timeout: float = 15.0) -> None:
        stop_process(self.proc, signal.SIGTERM, timeout)

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
