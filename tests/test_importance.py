"""Stage I: block importance, the pruning plan and the student it makes."""

import json
import types

import numpy as np
import pytest
import torch

from distill.importance import (block_importance, calibration_set, draw_noise, load_importance, render_importance,
                                save_importance, sigma_grid, skip_blocks)
from distill.plan import PruningPlan, apply_plan, block_params, make_plan, plan_from_drop
from flgengine.bundle import load_bundle, save_bundle
from flgengine.codec import uint8_to_video
from flgengine.config import ConfigError
from flgengine.model import DiT
from flgengine.text import TokenTextEncoder
from distill.worlds import shapes
from helpers import assert_close, tiny_config

SHAPE = (4, 4, 2, 4, 4)  # calibration x0: (N, C, F, H, W), 8 tokens per clip


def _model(**kw) -> DiT:
    return DiT(tiny_config(num_layers=6, **kw)).eval()


def _make_identity(block) -> None:
    """Zeroes every residual branch's output projection: the block returns its input exactly."""
    for linear in (block.self_attn.o, block.cross_attn.o, block.ffn.fc2):
        linear.weight.zero_()
        linear.bias.zero_()


@torch.no_grad()
def _exact_x0(model: DiT, context: torch.Tensor, t: float, seed: int) -> torch.Tensor:
    """Clips on which the full model is exact at noise level t with the noise of `seed`.

    With x_t = (1 - t) x0 + t eps, x0_hat = x0 is the fixed point z = eps - (1 - t) v(z)
    of x_t = z; at t = 0.9 the map contracts and converges in a few iterations.
    """
    eps = draw_noise(SHAPE, seed)
    timestep = torch.full((SHAPE[0],), 1000 * t)
    z = eps.clone()
    for _ in range(30):
        z = eps - (1 - t) * model(z, timestep, context)
    return z - t * model(z, timestep, context)


@torch.no_grad()
def test_known_answer_identity_block_is_free_and_a_boosted_block_matters_most():
    model = _model()
    _make_identity(model.blocks[2])
    for linear in (model.blocks[3].self_attn.o, model.blocks[3].cross_attn.o, model.blocks[3].ffn.fc2):
        linear.weight.mul_(10.0)  # block 3's residual branches scaled up
    context = torch.randn(SHAPE[0], 3, 12)
    x0 = _exact_x0(model, context, 0.9, seed=7)
    result = block_importance(model, x0, context, [0.9], seed=7, batch_size=3, progress=False)
    imp = result["importance"]
    assert result["full_error"] < 1e-10  # the full model is exact: I_b = error with b skipped >= 0
    assert imp[2] == 0.0  # skipping an identity block changes nothing, on the same noise
    assert all(v > 1e-6 for b, v in imp.items() if b != 2)
    assert max(imp, key=imp.get) == 3
    plan = make_plan(model, imp, budget=0.01)
    assert plan.drop == [2]  # the identity block goes first


@torch.no_grad()
def test_same_noise_for_every_block_and_t_and_a_deterministic_seed():
    model = _model()
    _make_identity(model.blocks[4])
    x0, context = torch.randn(SHAPE).clamp(-1, 1), torch.randn(SHAPE[0], 3, 12)
    ts = sigma_grid(3)
    a = block_importance(model, x0, context, ts, seed=1, batch_size=5, progress=False)
    assert [row["importance"][4] for row in a["per_t"]] == [0.0, 0.0, 0.0]  # same eps in both runs, at every t
    b = block_importance(model, x0, context, ts, seed=1, batch_size=1, progress=False)  # other chunking
    c = block_importance(model, x0, context, ts, seed=2, batch_size=5, progress=False)
    for blk in a["importance"]:
        assert a["importance"][blk] == pytest.approx(b["importance"][blk], rel=1e-4, abs=1e-9)
        mean_over_t = np.mean([row["importance"][blk] for row in a["per_t"]])
        assert a["importance"][blk] == pytest.approx(mean_over_t, rel=1e-9, abs=1e-12)
    assert a["importance"] == block_importance(model, x0, context, ts, seed=1, batch_size=5, progress=False)["importance"]
    assert a["importance"][1] != c["importance"][1]
    assert a["settings"]["ts"] == ts and a["settings"]["kept_blocks"] == list(range(6)) and not model.training


def test_skip_blocks_restores_the_model_even_on_error():
    model = _model()
    original = model.blocks
    with pytest.raises(RuntimeError):
        with skip_blocks(model, [1, 2]):
            assert len(model.blocks) == 4
            raise RuntimeError("boom")
    assert model.blocks is original
    with pytest.raises(ValueError, match="block positions"):
        with skip_blocks(model, [6]):
            pass


def test_calibration_set_gives_real_clips_and_their_embeddings():
    encoder = TokenTextEncoder(list(shapes.VOCAB), max_length=8, dim=12)
    x0, context = calibration_set(types.SimpleNamespace(text_encoder=encoder), n=2, seed=5)
    videos, prompts, _ = shapes.batch(5, 0, 2)
    assert x0.shape == (2, 3, shapes.NUM_FRAMES, shapes.SIZE, shapes.SIZE) and x0.min() >= -1 and x0.max() <= 1
    assert torch.equal(x0, uint8_to_video(torch.from_numpy(videos)))
    assert torch.equal(context, encoder.encode(prompts))
    assert torch.equal(calibration_set(encoder, n=2, seed=5)[0], x0)


# ---- plans ------------------------------------------------------------------------------

def test_budget_counts_parameters_not_blocks():
    model = _model(ffn_dim=96, block_ffn_dim=[96, 96, 8, 8, 96, 96])  # blocks 2 and 3 are small
    sizes, total = block_params(model), model.num_params()
    assert sizes[2] < sizes[1]
    importance = {0: 0.0, 1: 2.0, 2: 1.0, 3: 3.0, 4: 4.0, 5: 0.0}  # first and last least important
    # 15% of the parameters is under one block of six by count, but more than small block 2 holds
    plan = make_plan(model, importance, budget=0.15)
    assert plan.drop == [1, 2] and plan.keep == [0, 3, 4, 5]
    assert plan.removed_params == sizes[1] + sizes[2] and plan.total_params == total
    assert plan.removed_fraction >= 0.15 > sizes[2] / total
    # a budget met exactly by one count stops there
    assert make_plan(model, importance, budget=sizes[2] / total).drop == [2]
    assert make_plan(model, importance, budget=0.0).drop == []
    with pytest.raises(ValueError, match="out of reach"):
        make_plan(model, importance, budget=0.95)


def test_plan_json_round_trip_and_edited_plan_errors(tmp_path):
    model = _model()
    plan = make_plan(model, {b: float(b % 3) for b in range(6)}, source={"bundle": "runs/teacher/bundle"})
    assert 0 not in plan.drop and 5 not in plan.drop
    plan.to_json(tmp_path / "plan.json")
    assert PruningPlan.from_json(tmp_path / "plan.json") == plan

    def edited(**changes):
        path = tmp_path / "edited.json"
        path.write_text(json.dumps({**plan.to_dict(), **changes}))
        return PruningPlan.from_json(path)

    assert edited(keep=[5, 0, 2, 4], drop=[3, 1]).keep == [0, 2, 4, 5]  # order does not matter
    for changes, message in [
        ({"keep": [1, 2, 3, 4, 5], "drop": [0]}, "drop: block 0 is the first block"),
        ({"keep": [0, 1, 2, 3, 4], "drop": [5]}, "drop: block 5 is the last block"),
        ({"keep": [0, 1, 2, 5], "drop": [3, 4, 9]}, "drop: block 9 is not a teacher block index"),
        ({"keep": [0, 1, 2, 3, 5], "drop": [3, 4]}, "drop: block 3 is already listed in keep"),
        ({"keep": [0, 1, 5], "drop": [3, 4]}, "block 2 is in neither keep nor drop"),
        ({"budget": 1.5}, "budget must be"),
        ({"importance": [0.0]}, "importance must list one"),
        ({"dropped": [1]}, "unknown key 'dropped'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            edited(**changes)


@torch.no_grad()
def test_apply_plan_equals_bypassing_the_dropped_blocks(tmp_path):
    teacher = _model(ffn_dim=32, block_ffn_dim=[32, 16, 32, 8, 24, 32])
    plan = plan_from_drop(teacher, [1, 3], {b: 0.0 for b in range(6)})
    student = apply_plan(teacher, plan)
    assert type(student) is DiT and student.config.block_ids == [0, 2, 4, 5]
    assert student.config.block_ffn_dim == [32, 32, 24, 32]
    assert student.num_params() == teacher.num_params() - plan.removed_params
    assert student.blocks[1].ffn.fc1.weight.data_ptr() != teacher.blocks[2].ffn.fc1.weight.data_ptr()  # copies
    x, t, c = torch.randn(2, 4, 2, 4, 4), torch.tensor([100.0, 700.0]), torch.randn(2, 3, 12)
    with skip_blocks(teacher, plan.drop):
        bypassed = teacher(x, t, c)
    assert_close(student(x, t, c), bypassed, 1e-6, "student vs teacher with dropped blocks bypassed")
    assert (student(x, t, c) - teacher(x, t, c)).abs().max() > 1e-3  # and the dropped blocks did matter
    loaded = load_bundle(save_bundle(tmp_path / "student", student)).model
    assert loaded.config == student.config
    assert_close(loaded(x, t, c), bypassed, 1e-6, "student after save_bundle / load_bundle")
    with pytest.raises(ValueError, match="all 6 teacher blocks"):
        apply_plan(student, plan)


def test_save_importance_writes_json_and_png(tmp_path):
    import imageio.v3 as iio

    importance = {0: 0.5, 1: 0.01, 2: -0.002, 3: 0.02, 4: 0.03, 5: 0.4}
    result = {"importance": importance, "full_error": 0.1,
              "per_t": [{"t": 0.5, "full_error": 0.1, "importance": importance}],
              "settings": {"num_layers": 6, "ts": [0.5]}}
    save_importance(result, tmp_path / "imp.json", tmp_path / "imp.png")
    assert load_importance(tmp_path / "imp.json") == result  # int keys come back
    img = iio.imread(tmp_path / "imp.png")
    assert img.ndim == 3 and img.shape[2] == 3 and img.size > 0
    colours = {tuple(p) for p in img.reshape(-1, 3)}
    assert (230, 120, 40) in colours and (66, 114, 196) in colours  # first/last blocks marked apart
    # a plan's dropped blocks as grey bars (text anti-aliasing makes a few grey pixels too);
    # the bar of block 5 (0.4) is 0.4 / 0.03 as tall as block 4's
    marked = render_importance(result, drop=[1, 2])
    grey = [int((x == (190, 190, 190)).all(-1).sum()) for x in (img, marked)]
    assert grey[0] < 50 < 500 < grey[1], grey
    bars = marked[50:]  # below the legend
    heights = {c: int((bars == c).all(-1).any(1).sum()) for c in ((230, 120, 40), (66, 114, 196))}
    assert heights[(230, 120, 40)] > 10 * heights[(66, 114, 196)] > 0
