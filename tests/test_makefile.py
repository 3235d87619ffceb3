"""The Makefile: `make help` is the default goal and lists every target; only `make engines` and `make test` run the
full build (the serving targets serve what is installed: engines-quick); CI's `make test` runs lint first."""
from __future__ import annotations

import re
import subprocess

from rtinfer.launch.server import ROOT

MAKEFILE = (ROOT / "Makefile").read_text()
# serve what is installed: the quick export on a fresh clone, or the full build's variant
SERVING = ("demo", "serve", "serve-direct", "evaluate", "loadtest", "bench", "observe", "bench-gateway",
           "bench-fleet", "cascade-curve", "serve-edge-cloud")


def phony() -> list[str]:
    lines = re.findall(r"^\.PHONY:((?:.*\\\n)*.*)$", MAKEFILE, re.M)
    return " ".join(lines).replace("\\\n", " ").split()


def prerequisites() -> dict[str, list[str]]:
    return {m.group(1): m.group(2).split() for m in re.finditer(r"^([a-z][\w-]*):(?!=)([^#\n]*)", MAKEFILE, re.M)}


def test_make_help_is_the_default_goal_and_lists_every_target_once():
    assert re.search(r"^\.DEFAULT_GOAL := help$", MAKEFILE, re.M)
    out = subprocess.run(["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    lines = out.splitlines()
    listed = [line.split()[1] for line in lines]
    assert sorted(listed) == sorted(phony()) and len(set(listed)) == len(listed), out
    assert all(line.startswith("  make ") and len(line.split()) >= 3 for line in lines), out
    assert set(prerequisites()) == set(phony()), "every rule is phony and listed, every phony target has a rule"


def test_only_engines_and_test_run_the_full_build():
    rules = prerequisites()
    assert [t for t, deps in rules.items() if "engines" in deps] == ["test"]
    assert re.findall(r"^\t\$\(MAKE\) engines\b.*$", MAKEFILE, re.M) == \
        ["\t$(MAKE) engines DISTILL_STEPS=$(or $(DISTILL_STEPS),40)"]  # test-distill: a build with distillation
    for target in SERVING:
        assert "engines-quick" in rules[target], target


def test_ci_lints_and_the_fast_loop_leaves_out_servers_and_builds():
    rules = prerequisites()
    assert rules["test"][0] == "lint"
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("\nmake test")
    assert re.search(r'^test-unit:.*\n\t\$\(PY\) -m pytest -q -m "not integration and not distill"$', MAKEFILE, re.M)
