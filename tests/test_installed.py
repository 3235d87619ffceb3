"""build_engines.installed: what `make demo` and the serving targets say they serve, and which models they expose."""
from __future__ import annotations

import hashlib
import json

import pytest

from build_engines import installed


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """An empty model repository in place of the real one."""
    cpu, big = tmp_path / "classifier_onnx" / "1", tmp_path / "classifier_big" / "1"
    cpu.mkdir(parents=True)
    big.mkdir(parents=True)
    for name, value in (("MODEL", cpu / "model.onnx"), ("PORTABLE", cpu / "model.portable.onnx"),
                        ("MANIFEST", cpu / "manifest.json"), ("BIG_MODEL", big / "model.onnx")):
        monkeypatch.setattr(installed, name, value)
    return tmp_path


def install(variant: str, precision: str, data: bytes = b"weights") -> None:
    installed.MODEL.write_bytes(data)
    installed.PORTABLE.write_bytes(data)
    installed.MANIFEST.write_text(json.dumps({
        "variant": variant, "precision": precision, "sha256": hashlib.sha256(data).hexdigest(),
        "inputs": [{"name": "input", "dtype": "uint8", "shape": ["batch", 224, 224, 3]}]}))


def test_nothing_installed_says_how_to_get_a_classifier(repo, capsys):
    assert installed.manifest() is None and not installed.full_build()
    assert installed.main([]) == 2
    out = capsys.readouterr().out
    assert "no classifier installed" in out and "make engines-quick" in out


def test_the_quick_export_is_named_with_the_way_to_a_better_one(repo, capsys):
    install(installed.QUICK_VARIANT, "fp32")
    assert not installed.full_build()
    assert installed.main([]) == 0
    assert capsys.readouterr().out == ("[installed] serving the plain FP32 export (no optimized variant built yet: "
                                       "`make engines` builds one)\n")


def test_a_full_builds_variant_is_named_from_its_manifest(repo, capsys):
    install("ptq7-int8-ends-ortopt", "int8, 7-bit weights")
    assert installed.full_build()
    assert installed.main([]) == 0
    out = capsys.readouterr().out
    assert out == "[installed] serving the installed variant: ptq7-int8-ends-ortopt (int8, 7-bit weights)\n"


def test_a_file_that_does_not_match_its_manifest_is_not_served(repo):
    install("ptq7-int8-ends-ortopt", "int8")
    installed.MODEL.write_bytes(b"another file")
    assert installed.manifest() is None


def test_the_cascade_is_exposed_only_once_its_big_model_is_built(repo, capsys):
    install(installed.QUICK_VARIANT, "fp32")
    assert installed.main(["--models"]) == 0
    out, err = capsys.readouterr()
    assert out == "pipeline\n" and "`make engines` builds it" in err
    assert installed.main(["--require-cascade"]) == 2
    assert "run `make engines` first" in capsys.readouterr().out
    installed.BIG_MODEL.write_bytes(b"lite2")
    assert installed.main(["--models"]) == 0
    assert capsys.readouterr() == ("pipeline,cascade\n", "")
    assert installed.main(["--require-cascade"]) == 0
    assert capsys.readouterr() == ("", "")


def test_without_a_classifier_the_serving_targets_stop(repo, capsys):
    for argv in (["--models"], ["--require-cascade"]):
        assert installed.main(argv) == 2
        out, err = capsys.readouterr()
        assert "no classifier installed" in out + err and "pipeline" not in out
