"""SLO check of a Locust run: p50/p95/p99 and error rate against thresholds from a TOML file.

    python -m loadtest.slo build/loadtest/locust_stats.csv loadtest/slo.toml

Exits 1 and names every SLO that failed (which threshold, which request type, measured vs allowed).
"""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import tomllib

PERCENTILES = {"p50_ms": "50%", "p95_ms": "95%", "p99_ms": "99%"}
KNOWN = (*PERCENTILES, "error_rate")


@dataclass
class Verdict:
    slo: str
    target: str  # "grpc pipeline" or "Aggregated"
    measured: float
    allowed: float

    @property
    def ok(self) -> bool:
        return self.measured <= self.allowed

    def __str__(self) -> str:
        unit = "" if self.slo == "error_rate" else " ms"
        word = "ok    " if self.ok else "FAILED"
        return f"{word} {self.slo}: {self.target} = {self.measured:g}{unit} (allowed <= {self.allowed:g}{unit})"


def load(path: str | Path) -> dict[str, float]:
    slo = tomllib.loads(Path(path).read_text())
    unknown = set(slo) - set(KNOWN)
    if unknown:
        raise ValueError(f"{path}: unknown SLO keys {sorted(unknown)}; known: {list(KNOWN)}")
    return {k: float(v) for k, v in slo.items()}


def check(stats_csv: str | Path, slo: dict[str, float]) -> list[Verdict]:
    """One verdict per (SLO, row of Locust's _stats.csv); a run without requests fails every SLO."""
    with open(stats_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    verdicts = []
    for row in rows:
        target = f"{row['Type']} {row['Name']}".strip()
        count, fails = int(row["Request Count"]), int(row["Failure Count"])
        for key, allowed in slo.items():
            if count == 0:
                measured = float("inf")
            elif key == "error_rate":
                measured = round(fails / count, 6)
            else:
                measured = float(row[PERCENTILES[key]])
            verdicts.append(Verdict(key, target, measured, allowed))
    if not rows:
        verdicts = [Verdict(k, "no requests", float("inf"), v) for k, v in slo.items()]
    return verdicts


def report(verdicts: list[Verdict], source) -> int:
    """Say which SLOs failed, by name; the exit status for make."""
    failed = sorted({v.slo for v in verdicts if not v.ok})
    if failed:
        print(f"SLO check FAILED: {', '.join(failed)} (thresholds from {source})")
        return 1
    print(f"SLO check passed ({source})")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    verdicts = check(argv[0], load(argv[1]))
    for v in verdicts:
        print(v)
    return report(verdicts, argv[1])


if __name__ == "__main__":
    sys.exit(main())
