"""Pruning keeps the graph valid, stays within the fidelity budget, and prunes nothing when told to."""
import json

import numpy as np
import onnx
import pytest

from build_engines import evaluate, images, paths, prune

SOURCE = paths.SOURCE_DIR / "model.onnx"
PRUNED = paths.PRUNED_DIR / "model.onnx"


@pytest.fixture(scope="module")
def built():
    for p in (SOURCE, PRUNED, paths.IMAGES_DIR / "eval.npy", paths.IMAGES_DIR / "calib.npy"):
        if not p.exists():
            pytest.fail(f"{p} missing: run `make engines` (make test does it first)")
    return onnx.load(str(SOURCE))


@pytest.fixture(scope="module")
def eval_x():
    return images.to_batch(np.load(paths.IMAGES_DIR / "eval.npy"))


def test_pruned_graph_is_valid_with_consistent_shapes():
    m = onnx.load(str(PRUNED))
    inferred = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    onnx.checker.check_model(inferred, full_check=True)
    (inp,), (out,) = m.graph.input, m.graph.output
    assert inp.name == "input" and out.name == "logits"
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim][1:] == [3, 224, 224]
    assert [d.dim_value for d in out.type.tensor_type.shape.dim][1:] == [1000]
    # every depthwise conv's group count matches its weight and its producer's channel count
    inits = {i.name: i for i in m.graph.initializer}
    for n in m.graph.node:
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if n.op_type == "Conv" and group > 1:
            assert inits[n.input[1]].dims[0] == group


def test_pruned_model_within_budget_on_eval_split(built, eval_x):
    budget = json.loads((paths.PRUNED_DIR / "manifest.json").read_text())["figures"]["budget"]
    y = np.load(paths.IMAGES_DIR / "eval_labels.npy")
    ref = evaluate.Reference(evaluate.run(SOURCE, eval_x), y if len(y) else None)
    assert evaluate.run(PRUNED, eval_x).shape == (len(eval_x), 1000)
    assert evaluate.score(PRUNED, eval_x, ref)["quality"] >= budget   # accuracy with labels, else agreement


def test_pruning_zero_channels_is_bit_exact(built, eval_x):
    blocks = prune.find_blocks(built)
    assert len(blocks) == 15
    same = prune.apply(built, blocks, {b.index: 0 for b in blocks}, stats={})
    x = eval_x[:8]
    assert np.array_equal(evaluate.run(same.SerializeToString(), x), evaluate.run(SOURCE, x))


def test_channel_pruning_and_block_removal_keep_the_graph_valid(built, eval_x):
    blocks = prune.find_blocks(built)
    calib = images.to_batch(np.load(paths.IMAGES_DIR / "calib.npy")[:8])
    stats = prune.activation_stats(SOURCE, blocks, calib)
    residual = next(b for b in blocks if b.add)
    other = next(b for b in blocks if b.index != residual.index)
    plan = {residual.index: "remove", other.index: other.width // 2}
    m = prune.validate(prune.apply(built, blocks, plan, stats))
    dw = next(n for n in m.graph.node if n.name == other.depthwise)
    assert next(a.i for a in dw.attribute if a.name == "group") == other.width - other.width // 2
    assert not any(n.name in (residual.depthwise, residual.add) for n in m.graph.node)
    assert evaluate.run(m.SerializeToString(), eval_x[:4]).shape == (4, 1000)
