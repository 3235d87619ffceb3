"""The model repository as Triton reads it: every config parses, ensembles line up under each
host's config name (default = GPU hosts, cpu = CPU hosts), and the GPU-only models can never
reach a CPU host. Triton itself only finds these mistakes when a server loads the model."""
from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from rtinfer import labels

REPO = Path(__file__).resolve().parent.parent / "model_repository"
CONFIG_FILES = sorted(REPO.glob("*/config.pbtxt")) + sorted(REPO.glob("*/configs/*.pbtxt"))
MODELS = sorted(p.parent.name for p in REPO.glob("*/config.pbtxt"))
VARIANTS = ["default"] + sorted({p.stem for p in REPO.glob("*/configs/*.pbtxt")})
AB_ARMS = {"pipeline_fp16": "classifier_trt_fp16", "pipeline_int8": "classifier_trt_int8",
           "pipeline_onnx": "classifier_onnx"}
TRT_MODELS = ("classifier_trt_fp16", "classifier_trt_int8")
CLASSIFIERS = ("classifier_onnx",) + TRT_MODELS


def parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def config(model: str, variant: str) -> mc.ModelConfig:
    """The config Triton loads for `model` under --model-config-name=<variant> (falls back to config.pbtxt)."""
    chosen = REPO / model / "configs" / f"{variant}.pbtxt"
    return parse(chosen if variant != "default" and chosen.exists() else REPO / model / "config.pbtxt")


def ensembles() -> list[str]:
    return [m for m in MODELS if parse(REPO / m / "config.pbtxt").platform == "ensemble"]


def tensors(cfg: mc.ModelConfig, which: str) -> dict:
    return {t.name: (mc.DataType.Name(t.data_type), list(t.dims)) for t in getattr(cfg, which)}


def classifier_step(cfg: mc.ModelConfig) -> str:
    steps = [s.model_name for s in cfg.ensemble_scheduling.step if s.model_name.startswith("classifier_")]
    assert len(steps) == 1, (cfg.name, steps)
    return steps[0]


def closure(model: str, variant: str) -> set[str]:
    """Everything `--load-model=<model>` loads under a config name (an ensemble brings its steps)."""
    cfg = config(model, variant)
    out = {model}
    for step in cfg.ensemble_scheduling.step:
        out |= closure(step.model_name, variant)
    return out


def test_repository_is_found():
    assert {"pipeline", "preprocess", "postprocess", *CLASSIFIERS, *AB_ARMS} <= set(MODELS)
    assert set(ensembles()) == {"pipeline", *AB_ARMS}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_config_parses_and_is_named_after_its_directory(path):
    cfg = parse(path)
    model_dir = path.parent if path.name == "config.pbtxt" else path.parent.parent
    assert cfg.name == model_dir.name
    assert cfg.platform or cfg.backend


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ensemble", ensembles())
def test_ensemble_tensors_line_up(ensemble, variant):
    """Each step input comes from the ensemble input or an earlier step output with the composing
    model's dtype and dims; every composing input is fed; every ensemble output is produced."""
    ens = config(ensemble, variant)
    assert ens.platform == "ensemble" and ens.ensemble_scheduling.step
    available = tensors(ens, "input")
    ens_outputs = tensors(ens, "output")
    for step in ens.ensemble_scheduling.step:
        assert (REPO / step.model_name / "config.pbtxt").exists(), f"{ensemble}: no model {step.model_name}"
        model = config(step.model_name, variant)
        assert model.platform != "ensemble", "nested ensembles are not used here"
        assert 0 < ens.max_batch_size <= model.max_batch_size, (step.model_name, model.max_batch_size)
        m_in, m_out = tensors(model, "input"), tensors(model, "output")
        assert set(step.input_map) == set(m_in), f"{ensemble}->{step.model_name}: inputs {set(m_in)}"
        for model_input, ens_tensor in step.input_map.items():
            assert ens_tensor in available, f"{ensemble}->{step.model_name}: {ens_tensor!r} not produced before"
            assert available[ens_tensor] == m_in[model_input], (step.model_name, model_input, ens_tensor)
        for model_output, ens_tensor in step.output_map.items():
            assert model_output in m_out, f"{step.model_name} has no output {model_output!r}"
            assert ens_tensor not in available, f"{ensemble}: {ens_tensor!r} produced twice"
            if ens_tensor in ens_outputs:
                assert ens_outputs[ens_tensor] == m_out[model_output], (ensemble, ens_tensor)
            available[ens_tensor] = m_out[model_output]
    assert set(ens_outputs) <= set(available), f"{ensemble}: outputs never produced"


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_response_cache_on_audited_models(variant):
    """A cache hit skips every step of an ensemble, so the audit record would never be written."""
    for model in [m for m in MODELS if m.startswith("preprocess")] + ["postprocess", *ensembles()]:
        cfg = config(model, variant)
        assert not (cfg.HasField("response_cache") and cfg.response_cache.enable), model


def test_label_files_equal_rtinfer_labels():
    found = 0
    for model in MODELS:
        for path in [REPO / model / "config.pbtxt", *sorted((REPO / model / "configs").glob("*.pbtxt"))]:
            for out in parse(path).output:
                if out.label_filename:
                    names = (REPO / model / out.label_filename).read_text().splitlines()
                    assert tuple(names) == labels.names(), f"{model}/{out.label_filename}"
                    found += 1
    assert found >= 1 + len(AB_ARMS)


# --- GPU hosts (default configs) -------------------------------------------------------------

def test_default_pipeline_runs_the_fp16_engine():
    assert classifier_step(config("pipeline", "default")) == "classifier_trt_fp16"


@pytest.mark.parametrize("arm", AB_ARMS)
def test_ab_arms_are_the_pipeline_with_another_classifier(arm):
    """Same tensors, steps and batching as `pipeline`: only the name, the classifier and the arm's own
    preprocess (the same stage, accepting envelopes sealed for this arm only) differ."""
    got = config(arm, "default")
    assert classifier_step(got) == AB_ARMS[arm]
    want = config("pipeline", "default")
    want.name = arm
    for step in want.ensemble_scheduling.step:
        if step.model_name.startswith("classifier_"):
            step.model_name = AB_ARMS[arm]
        elif step.model_name == "preprocess":
            step.model_name = preprocess_step(got)
    assert got == want


def preprocess_step(cfg: mc.ModelConfig) -> str:
    [step] = [s.model_name for s in cfg.ensemble_scheduling.step if s.model_name.startswith("preprocess")]
    return step


@pytest.mark.parametrize("model", sorted(m for m in MODELS if m.startswith("preprocess_")))
def test_each_arms_preprocess_is_preprocess_with_its_own_audience(model):
    """Issue 20 (2): only the name and the accepted pipeline differ, and it runs the same code."""
    got, want = config(model, "default"), config("preprocess", "default")
    assert got.parameters["pipelines"].string_value == "pipeline_" + model.removeprefix("preprocess_")
    want.name = model
    want.parameters["pipelines"].string_value = got.parameters["pipelines"].string_value
    assert got == want
    assert (REPO / model / "1").resolve() == (REPO / "preprocess" / "1").resolve()
    assert not (REPO / model / "configs").exists() and not (REPO / "preprocess" / "configs").exists()


@pytest.mark.parametrize("model", TRT_MODELS)
def test_tensorrt_models(model):
    cfg = config(model, "default")
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 16
    assert tensors(cfg, "input") == {"input": ("TYPE_UINT8", [224, 224, 3])}
    assert tensors(cfg, "output") == {"logits": ("TYPE_FP32", [1000])}
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 2)]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert 0 < cfg.dynamic_batching.max_queue_delay_microseconds <= 1000
    assert not (REPO / model / "configs").exists(), "GPU-only: no per-host config (the CPU host never loads it)"


def test_onnx_classifier_is_heterogeneous_on_gpu_hosts():
    kinds = {g.kind for g in config("classifier_onnx", "default").instance_group}
    assert kinds == {mc.ModelInstanceGroup.KIND_GPU, mc.ModelInstanceGroup.KIND_CPU}


@pytest.mark.parametrize("model", CLASSIFIERS)
def test_classifier_warmup(model):
    """Batch 1 and 8 warmups whose inputs match the model's inputs exactly."""
    cfg = config(model, "default")
    assert sorted(w.batch_size for w in cfg.model_warmup) == [1, 8]
    for w in cfg.model_warmup:
        assert 0 < w.batch_size <= cfg.max_batch_size
        assert set(w.inputs) == set(tensors(cfg, "input"))
        for name, data in w.inputs.items():
            assert (mc.DataType.Name(data.data_type), list(data.dims)) == tensors(cfg, "input")[name]
            assert data.WhichOneof("input_data_type") in ("zero_data", "random_data")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ensemble", ensembles())
def test_each_ensemble_accepts_only_envelopes_sealed_for_it(ensemble, variant):
    """Issue 20 (2): a preprocess that accepted every pipeline's envelopes let one sealed for
    pipeline_int8 be served by `pipeline` and audited as pipeline_int8, naming a classifier that
    did not answer. Triton does not tell a step which ensemble called it: one preprocess per ensemble."""
    params = config(preprocess_step(config(ensemble, variant)), variant).parameters
    assert params["pipelines"].string_value == ensemble


@pytest.mark.parametrize("variant", VARIANTS)
def test_audit_names_the_classifier_each_pipeline_runs(variant):
    """postprocess's classifier_models is what the audit record says served the request."""
    raw = config("postprocess", variant).parameters["classifier_models"].string_value
    mapping = dict(item.split("=", 1) for item in raw.split(",") if item)
    for ens in ensembles():
        runnable = variant == "default" or not (closure(ens, variant) & set(TRT_MODELS))
        if runnable:
            model, _, filename = mapping.get(ens, "").partition("/")
            assert model == classifier_step(config(ens, variant)), (ens, mapping.get(ens))
            loads = config(model, variant).default_model_filename
            if loads or filename:  # the audit names the file that host loads
                assert filename == (loads or "model.onnx"), (ens, variant, filename, loads)


# --- CPU hosts -------------------------------------------------------------------------------

def test_cpu_host_loads_no_gpu_model():
    """`--model-config-name=cpu --load-model=pipeline` must bring only CPU instances and no engine."""
    loaded = closure("pipeline", "cpu")
    assert loaded == {"pipeline", "preprocess", "classifier_onnx", "postprocess"}
    for model in loaded:
        cfg = config(model, "cpu")
        assert cfg.platform != "tensorrt_plan", model
        assert all(g.kind == mc.ModelInstanceGroup.KIND_CPU for g in cfg.instance_group), model


# --- the cascade (issue 12) ------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_cascade_checks_envelopes_as_preprocess_does(variant):
    """The settings the cascade shares with preprocess (limits, replay, audit) have the same values,
    so a request is refused for the same reasons whichever it is sent to; its own audience only."""
    casc, pre = config("cascade", variant).parameters, config("preprocess", variant).parameters
    shared = set(casc) & set(pre) - {"pipelines"}
    assert {"max_envelope_bytes", "max_pixels", "replay_window_s", "replay_future_skew_s", "crop",
            "jpeg_draft", "audit_fsync", "audit_max_bytes"} <= shared
    for key in shared:
        assert casc[key].string_value == pre[key].string_value, key
    assert casc["pipelines"].string_value == "cascade" and "cascade" not in pre["pipelines"].string_value.split(",")


@pytest.mark.parametrize("variant", VARIANTS)
def test_cascade_tensors_match_the_pipeline_and_its_classifiers(variant):
    casc, pipe = config("cascade", variant), config("pipeline", variant)
    assert tensors(casc, "input") == tensors(pipe, "input") and tensors(casc, "output") == tensors(pipe, "output")
    assert not casc.HasField("response_cache") or not casc.response_cache.enable
    p = casc.parameters
    edge, big = config(p["edge_model"].string_value, variant), config(p["cloud_model"].string_value, variant)
    assert tensors(edge, "input")["input"] == ("TYPE_UINT8", [224, 224, 3])
    assert tensors(big, "input")["input"] == ("TYPE_UINT8", [int(p["cloud_size"].string_value)] * 2 + [3])
    assert tensors(big, "output") == tensors(edge, "output")
    assert casc.max_batch_size <= min(edge.max_batch_size, big.max_batch_size)
    for cfg in (edge, big):
        assert cfg.HasField("dynamic_batching"), cfg.name
    loads = edge.default_model_filename or "model.onnx"
    assert p["edge_model_file"].string_value == loads  # the audit names the file this host loads
    assert 0 <= float(p["threshold"].string_value) and p["confidence_metric"].string_value in ("top1", "margin")


def test_big_classifier_on_the_gpu_on_gpu_hosts_on_the_cpu_on_cpu_hosts():
    assert {g.kind for g in config("classifier_big", "default").instance_group} == {mc.ModelInstanceGroup.KIND_GPU}
    assert {g.kind for g in config("classifier_big", "cpu").instance_group} == {mc.ModelInstanceGroup.KIND_CPU}


def test_on_gpu_hosts_the_big_model_uses_the_gpu_and_the_edge_model_the_cpu():
    """Issue 12: the cascade's big model on the GPU instance group, the small one on CPU instances."""
    p = config("cascade", "default").parameters
    edge, big = config(p["edge_model"].string_value, "default"), config(p["cloud_model"].string_value, "default")
    assert {g.kind for g in edge.instance_group} == {mc.ModelInstanceGroup.KIND_CPU}
    assert {g.kind for g in big.instance_group} == {mc.ModelInstanceGroup.KIND_GPU}
    assert (REPO / "classifier_edge" / "1").resolve() == (REPO / "classifier_onnx" / "1").resolve()


def test_cpu_host_cascade_loads_no_gpu_model():
    from rtinfer.launch.server import with_targets
    loaded = with_targets(["cascade"], REPO, "cpu")
    assert loaded == ["cascade", "classifier_onnx", "classifier_big"]
    for model in loaded:
        assert all(g.kind == mc.ModelInstanceGroup.KIND_CPU for g in config(model, "cpu").instance_group), model
