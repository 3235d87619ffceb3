"""The flags of `python -m build_engines` (build_engines/cli.py): what the Makefile passes exists,
defaults and the quality budget resolve as documented, and `--help` lists them. No build."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from build_engines import cli

ROOT = Path(__file__).resolve().parents[1]


def flags() -> set[str]:
    return {s for a in cli.parser()._actions for s in a.option_strings}


def test_the_makefile_passes_only_flags_that_exist():
    text = (ROOT / "Makefile").read_text()
    # with continuation lines; not build_engines.<module>
    commands = re.findall(r"-m build_engines(?![\w.])((?:[^\n]*\\\n)*[^\n]*)", text)
    passed = {f for command in commands for f in re.findall(r"--[a-z0-9-]+", command)}
    assert passed and passed <= flags(), passed - flags()


def test_defaults():
    args = cli.parse_args([])
    assert args.budget == 0.97 and args.margin == 0.005 and args.eval_n == 400 and args.calib_n == 256
    assert args.distill_flops == cli.DISTILL_FLOPS and args.distill_keep == [] and args.distill_steps == 0
    assert args.qat_steps == cli.QAT_STEPS == 40 and args.calib_methods == ["minmax", "percentile"]
    assert not args.quick and args.labeled_dir is None and args.distill_teacher == "lite0"


@pytest.mark.parametrize("argv, budget", [
    ([], 0.97),                                                    # unlabeled: top-1 agreement
    (["--labeled-dir", "photos"], 0.99),                           # labeled: 1 point of top-1 by default
    (["--labeled-dir", "photos", "--budget-points", "2.5"], 0.975),
    (["--labeled-dir", "photos", "--budget", "0.9"], 0.9),          # an explicit floor wins
])
def test_budget(argv, budget):
    assert cli.parse_args(argv).budget == pytest.approx(budget)


def test_lists_of_floats():
    args = cli.parse_args(["--distill-flops", "0.1,0.3", "--distill-keep", "0.5,"])
    assert args.distill_flops == [0.1, 0.3] and args.distill_keep == [0.5]


def test_bad_choice_is_refused():
    with pytest.raises(SystemExit):
        cli.parse_args(["--distill-teacher", "lite9"])


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, "-m", "build_engines", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.startswith("usage: python -m build_engines") and cli.DESCRIPTION.splitlines()[0] in out
    assert all(f in out for f in flags())
