"""The DiT: pruned students are the same class and compute what pruning promises."""


import pytest
import torch

from flgengine.model import DiT
from helpers import assert_close, tiny_config


def _inputs(B=2, C=4, F=3, H=6, W=4, L=5, text_dim=12):
    return torch.randn(B, C, F, H, W), torch.tensor([10.0, 900.0])[:B], torch.randn(B, L, text_dim)


def _sliced_student(teacher: DiT, **pruning) -> DiT:
    """A student built from the teacher's weights: kept blocks renumbered, widths sliced."""
    cfg = tiny_config(**pruning)
    student = DiT(cfg).eval()
    src = teacher.state_dict()
    out = {}
    for k, v in student.state_dict().items():
        if k.startswith("blocks."):
            i, rest = int(k.split(".")[1]), k.split(".", 2)[2]
            v_src = src[f"blocks.{cfg.kept_blocks[i]}.{rest}"]
            out[k] = v_src[tuple(slice(0, n) for n in v.shape)]  # leading channels kept
        else:
            out[k] = src[k]
    student.load_state_dict(out)
    return student


def test_block_pruned_student_equals_teacher_with_those_blocks_skipped():
    teacher = DiT(tiny_config()).eval()
    student = _sliced_student(teacher, block_ids=[0, 2, 3])
    x, t, c = _inputs()
    skipped = DiT(tiny_config()).eval()
    skipped.load_state_dict(teacher.state_dict())
    # block 1 bypassed: the stream and the previous block's pending residual pass through
    skipped.blocks[1].forward = lambda x, context, t_mod, rope, pending, **kw: (x, pending)
    with torch.no_grad():
        assert_close(student(x, t, c), skipped(x, t, c), 1e-6, "block pruning")
        assert (student(x, t, c) - teacher(x, t, c)).abs().max() > 1e-3  # and the block did matter
    assert student.num_params() < teacher.num_params()


def test_ffn_width_pruning_equals_zeroing_the_dropped_channels():
    teacher = DiT(tiny_config()).eval()
    student = _sliced_student(teacher, block_ffn_dim=[24, 10, 24, 7])
    zeroed = DiT(tiny_config()).eval()
    zeroed.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        zeroed.blocks[1].ffn.fc2.weight[:, 10:] = 0
        zeroed.blocks[3].ffn.fc2.weight[:, 7:] = 0
        x, t, c = _inputs()
        assert_close(student(x, t, c), zeroed(x, t, c), 1e-6, "ffn pruning")


def test_head_pruned_student_runs_and_is_smaller():
    cfg = tiny_config(block_ids=[0, 1, 3], block_num_heads=[2, 1, 1], block_ffn_dim=[24, 8, 16])
    model = DiT(cfg).eval()
    assert model.blocks[1].self_attn.q.weight.shape == (8, 16)  # 1 head x 8 dims, width 16
    assert model.num_params() < DiT(tiny_config()).num_params()
    x, t, c = _inputs()
    with torch.no_grad():
        out = model(x, t, c)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_absolute_position_embedding():
    from flgengine.convert import to_diffusers

    torch.manual_seed(0)
    model = DiT(tiny_config(pos_embed=True)).eval()
    x, t, c = torch.zeros(1, 4, 2, 4, 4), torch.tensor([900.0]), torch.zeros(1, 3, 12)
    with torch.no_grad():
        out = model(x, t, c)
        # a constant input: without absolute positions every token would give the same output
        tokens = out.unflatten(3, (2, 2)).unflatten(5, (2, 2))  # (1, C, F, H', ph, W', pw)
        assert (tokens[:, :, 0, 0, :, 0] - tokens[:, :, 1, 1, :, 1]).abs().max() > 1e-4
        plain = DiT(tiny_config()).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("pos_")})
        p = plain(x, t, c).unflatten(3, (2, 2)).unflatten(5, (2, 2))
        assert (p[:, :, 0, 0, :, 0] - p[:, :, 1, 1, :, 1]).abs().max() < 1e-5
        # pos = frame + row + column embeddings, added after patchify
        model.pos_frame.zero_(), model.pos_row.zero_(), model.pos_col.zero_()
        assert torch.allclose(model(x, t, c), plain(x, t, c), atol=1e-6)
    with pytest.raises(ValueError, match="pos_embed"):
        to_diffusers(model, "/nonexistent")


def test_position_table_per_token():
    torch.manual_seed(0)
    model = DiT(tiny_config(pos_embed=True, pos_grid=(2, 3, 2))).eval()
    assert model.pos_table.shape == (2, 3, 2, 16) and not hasattr(model, "pos_frame")
    x, t, c = torch.zeros(1, 4, 2, 4, 4), torch.tensor([900.0]), torch.zeros(1, 3, 12)
    with torch.no_grad():
        base = model(x, t, c)
        # one token's vector moves only that token's output when the blocks are bypassed
        for block in model.blocks:
            block.forward = lambda h, context, t_mod, rope, pending, **kw: (h, pending)
        before = model(x, t, c)
        model.pos_table[1, 0, 1] += 1.0
        diff = (model(x, t, c) - before).abs().amax(dim=(0, 1))  # (F, H, W) pixels
        assert diff[1, 0:2, 2:4].min() > 0 and diff.sum() == diff[1, 0:2, 2:4].sum()
    assert torch.isfinite(base).all()
    with pytest.raises(ValueError, match="pos_grid"):
        model(torch.zeros(1, 4, 3, 4, 4), t, c)  # 3 frames > the table's 2
    with pytest.raises(Exception, match="pos_grid needs pos_embed"):
        tiny_config(pos_grid=(2, 2, 2))


def _with_plain_twin(**option):
    """A tiny DiT with an output `option` and the same weights without it."""
    torch.manual_seed(0)
    model = DiT(tiny_config(**option)).eval()
    plain = DiT(tiny_config()).eval()
    plain.load_state_dict(model.state_dict())
    return model, plain


def test_x0_prediction_returns_the_velocity_of_the_networks_x0():
    from flgengine.convert import to_diffusers

    model, plain = _with_plain_twin(x0_prediction=0.05)
    x, _, c = _inputs()
    t = torch.tensor([20.0, 600.0])[: x.shape[0]]  # below and above the floor
    with torch.no_grad():
        x0_hat = plain(x, t, c)  # the same network, read as an x0 estimate
        sigma = torch.tensor([0.05, 0.6])[: x.shape[0]].view(-1, 1, 1, 1, 1)
        assert_close(model(x, t, c), (x - x0_hat) / sigma, 1e-6, "x0 prediction")
    for bad in (0.0, 1.0, True, "0.05"):
        with pytest.raises(ValueError, match="x0_prediction"):
            tiny_config(x0_prediction=bad)
    with pytest.raises(ValueError, match="cannot both be set"):
        tiny_config(x0_prediction=0.05, velocity_skip=0.5)
    with pytest.raises(ValueError, match="x0_prediction"):
        to_diffusers(model, "/nonexistent")


def test_velocity_skip_adds_the_linear_prediction():
    from flgengine.convert import to_diffusers
    from flgengine.model.dit import velocity_skip

    model, plain = _with_plain_twin(velocity_skip=0.5)
    x, t, c = _inputs()
    with torch.no_grad():
        skip = velocity_skip(t, 0.5)
        assert_close(model(x, t, c), plain(x, t, c) + skip.view(-1, 1, 1, 1, 1) * x, 1e-6, "velocity skip")
    # c_skip is the least-squares coefficient of v = eps - x0 on x_t for data of std 0.5
    g = torch.Generator().manual_seed(1)
    x0, eps = 0.5 * torch.randn(200000, generator=g, dtype=torch.float64), torch.randn(200000, generator=g, dtype=torch.float64)
    for s in (0.05, 0.5, 0.95):
        xt, v = (1 - s) * x0 + s * eps, eps - x0
        fit = (xt * v).mean() / (xt * xt).mean()
        assert abs(fit.item() - velocity_skip(torch.tensor([1000.0 * s]), 0.5).item()) < 0.01
    assert velocity_skip(torch.tensor([1000.0]), 0.5).item() == 1.0  # pure noise: v = x_t - x0
    with pytest.raises(ValueError, match="velocity_skip"):
        to_diffusers(model, "/nonexistent")


def test_pooled_text_reaches_the_timestep_path_and_ignores_padding():
    from flgengine.convert import to_diffusers
    from flgengine.model.embed import mean_text

    torch.manual_seed(0)
    model = DiT(tiny_config(pooled_text=True)).eval()
    # mean over real (non-zero) rows: padding does not change it, all padding pools to zero
    words = torch.randn(2, 3, 12)
    padded = torch.cat([words, torch.zeros(2, 4, 12)], dim=1)
    assert torch.allclose(mean_text(padded), words.mean(dim=1), atol=1e-6)
    assert mean_text(torch.zeros(1, 5, 12)).abs().max() == 0
    x, t, _ = _inputs()
    with torch.no_grad():
        # close the cross-attention (which does see padding): the pooled path alone carries the text
        for block in model.blocks:
            block.cross_attn.o.weight.zero_(), block.cross_attn.o.bias.zero_()
        assert_close(model(x, t, padded), model(x, t, words), 1e-6, "pooled text vs padding")
        assert (model(x, t, padded) - model(x, t, padded.flip(0))).abs().max() > 1e-4
        # per-token timesteps take the same pooled vector
        S = 3 * 3 * 2
        assert_close(model(x, t[:, None].expand(2, S), padded), model(x, t, padded), 1e-5, "per-token t")
        model.text_pool.fc2.weight.zero_(), model.text_pool.fc2.bias.zero_()
        assert (model(x, t, padded) - model(x, t, padded.flip(0))).abs().max() < 1e-6  # nothing else carries text now
    with pytest.raises(ValueError, match="pooled_text"):
        to_diffusers(model, "/nonexistent")


def test_bf16_cast_keeps_modulation_in_fp32_and_tracks_fp32_output():
    model = DiT(tiny_config()).eval()
    x, t, c = _inputs()
    with torch.no_grad():
        ref = model(x, t, c)
        model.cast(torch.bfloat16)
        assert model.blocks[0].modulation.dtype == torch.float32 and model.time_embed.fc1.weight.dtype == torch.float32
        assert model.blocks[0].ffn.fc1.weight.dtype == torch.bfloat16
        out = model(x.bfloat16(), t, c.bfloat16())
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), ref, 5e-2, "bf16 vs fp32")


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(1, 3, 2, 4, 4)), r"x must be \(B, 4, F, H, W\)"),
    (dict(x=torch.randn(1, 4, 2, 5, 4)), "latent height 5 is not divisible by the patch size 2"),
    (dict(t=torch.tensor(3.0)), "scalar"),
    (dict(t=torch.ones(2)), r"t must be \(1,\)"),
    (dict(context=torch.randn(1, 5, 7)), r"context must be \(1, L, 12\)"),
])
def test_bad_inputs_are_named_before_compute(bad, match):
    args = dict(x=torch.randn(1, 4, 2, 4, 4), t=torch.ones(1), context=torch.randn(1, 5, 12))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        DiT(tiny_config())(**args)


def test_gradients_flow_through_the_reference_ops():
    model = DiT(tiny_config())
    x, t, c = _inputs()
    model(x, t, c).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_dit_on_cuda_native_ops_match_reference(dtype, tol, monkeypatch):
    # cuDNN runs fp32 convolutions (the patch embedding) in TF32 by default: off, to compare with the CPU
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = DiT(tiny_config()).cuda().cast(dtype).eval()
    x, t, c = (a.cuda() for a in _inputs())
    x, c = x.to(dtype), c.to(dtype)
    with torch.no_grad():
        model.backend = "ref"
        expect = model(x, t, c).float()
        model.backend = "cuda"
        got = model(x, t, c).float()
        cpu = DiT(tiny_config()).eval()
        cpu.load_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()})
        on_cpu = cpu(x.float().cpu(), t.cpu(), c.float().cpu())
    assert_close(got, expect, tol, f"cuda vs ref {dtype}")
    assert_close(got.cpu(), on_cpu, max(tol, 1e-4) if dtype == torch.float32 else tol * 2, f"cuda vs cpu {dtype}")


@pytest.mark.parametrize("option", [{"velocity_skip": 0.5}, {"x0_prediction": 0.05}])
def test_output_skips_take_per_token_timesteps(option):
    """velocity_skip / x0_prediction with one timestep per token (image-to-video first_frame):
    equal per-token t is the per-sample call; each latent position takes its token's value."""
    torch.manual_seed(0)
    model = DiT(tiny_config(**option)).eval()
    x, ctx = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 3, 12)
    S = 2 * 2 * 2  # (2, 4, 4) latents, patch (1, 2, 2): a (2, 2, 2) token grid
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        assert_close(model(x, t[:, None].expand(2, S), ctx), model(x, t, ctx), 1e-5, "equal per-token t")
        tt = t[:, None].expand(2, S).clone()
        tt[:, :4] = 0.0  # frame 0's tokens at t = 0
        out = model(x, tt, ctx)
    assert torch.isfinite(out).all() and not torch.allclose(out, model(x, t, ctx))
    tokens = torch.arange(S, dtype=torch.float32).view(1, S)
    pos = model._per_position(tokens, (2, 2, 2))  # (1, 1, 2, 4, 4)
    f, h, w = torch.meshgrid(torch.arange(2), torch.arange(4), torch.arange(4), indexing="ij")
    assert torch.equal(pos[0, 0], (f * 4 + (h // 2) * 2 + w // 2).float())  # each position: its patch's token
