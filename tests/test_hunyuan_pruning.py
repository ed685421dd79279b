"""Stage I on a HunyuanVideo teacher: both block kinds scored on one scale, the plan keeps the
first and last block of each kind, and the pruned student computes the teacher with the
dropped blocks bypassed."""

import math

import torch

from distill.importance import block_importance, skip_blocks
from distill.plan import apply_plan, make_plan
from flgengine.conditioning import ExtraInputs
from flgengine.model.hunyuan import HunyuanVideoConfig, HunyuanVideoDiT, pack_text
from helpers import assert_close


def _teacher():
    torch.manual_seed(0)
    config = HunyuanVideoConfig(in_channels=4, out_channels=4, num_heads=2, head_dim=8, num_layers=4,
                                num_single_layers=5, num_refiner_layers=1, mlp_ratio=2.0, text_dim=6, pooled_dim=3,
                                rope_axes=(2, 2, 4), guidance_embed=True)
    model = HunyuanVideoDiT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_stage_one_scores_both_kinds_and_keeps_the_ends_of_each():
    teacher = _teacher()
    g = torch.Generator().manual_seed(1)
    N = 3
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    x0 = torch.randn(N, 4, 2, 4, 4, generator=g)
    context = pack_text(torch.randn(N, 5, 6, generator=g), mask, torch.randn(N, 3, generator=g))  # (N, 6, 6)
    extra = ExtraInputs({"guidance": torch.full((N,), 4000.0)})
    result = block_importance(teacher, x0, context, [0.3, 0.8], batch_size=4, progress=False, cond=extra)
    assert sorted(result["importance"]) == list(range(9)) and result["settings"]["protected"] == [0, 3, 4, 8]
    assert all(math.isfinite(v) and v != 0 for v in result["importance"].values())  # every skip changes x0_hat
    plan = make_plan(teacher, result["importance"], budget=0.3)
    assert not {0, 3, 4, 8} & set(plan.drop) and plan.removed_fraction >= 0.3
    # the least important candidates go first, across both kinds
    candidates = sorted((b for b in range(9) if b not in (0, 3, 4, 8)), key=lambda b: (result["importance"][b], b))
    assert plan.drop == sorted(candidates[:len(plan.drop)])
    student = apply_plan(teacher, plan)
    assert student.config.block_ids == plan.keep and len(student.blocks) == 9 - len(plan.drop)
    x, t = torch.randn(N, 4, 2, 4, 4, generator=g), torch.tensor([100.0, 500.0, 900.0])
    with torch.no_grad(), skip_blocks(teacher, plan.drop):
        want = extra.model(teacher)(x, t, context)
    with torch.no_grad():
        assert_close(extra.model(student)(x, t, context), want, 1e-6, "student = teacher with blocks bypassed")
