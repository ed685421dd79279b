"""FP8 precision of the DiT (flgengine/model/precision.py) and block-sparse self-attention in
the model, on the CPU (FP8 emulated: the e4m3 values and scales the GPU path uses, fp32
products) and, with the `gpu` marker, the FP8 tensor-core path against that emulation."""

from __future__ import annotations

import copy

import pytest
import torch

from flgengine.model import DiT
from flgengine.model.precision import FP8_LINEARS, FP8Linear, QuantizedTokens, set_precision, to_fp8
from flgengine.ops import fp8 as F8
from flgengine.ops.block_mask import BlockMask, random_block_mask
from helpers import assert_close, rel_err, tiny_config


def _inputs(cfg, B=2, F=3, H=8, W=8, L=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, cfg.in_channels, F, H, W, generator=g)
    return x, torch.tensor([700.0, 300.0]), torch.randn(B, L, cfg.text_dim, generator=g)


def test_fp8_linear_is_the_dequantised_product():
    lin = torch.nn.Linear(40, 24)
    x = torch.randn(3, 7, 40)
    f = FP8Linear.from_linear(lin)
    assert f.weight.dtype == torch.float8_e4m3fn and f.weight_scale.shape == (24, 1)
    x8, sx = F8.quantize_tokens(x.reshape(-1, 40))
    expect = (x8.float() * sx) @ (f.weight.float() * f.weight_scale).t() + lin.bias.detach()
    assert_close(f(x), expect.reshape(3, 7, 24), 1e-6, "FP8Linear emulated")
    err = rel_err(f(x), lin(x).detach())
    assert 1e-3 < err < 0.08, err  # it quantises; e4m3 keeps a few percent
    assert_close(f(QuantizedTokens(x)), f(x), 0.0, "pre-quantised input")


def test_fp8_model_is_close_to_the_bf16_model_and_really_quantises():
    cfg = tiny_config(num_heads=2, head_dim=16, ffn_dim=48, num_layers=3)
    torch.manual_seed(0)
    model = DiT(cfg).eval()
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        ref = model(x, t, ctx)
        fp8 = copy.deepcopy(model)
        set_precision(fp8, "fp8")
        out = fp8(x, t, ctx)
    for block in fp8.blocks:
        for name in FP8_LINEARS:
            assert isinstance(block.get_submodule(name), FP8Linear), name
        assert block.self_attn.precision == "fp8" and block.cross_attn.precision is None
    assert isinstance(fp8.head.proj, torch.nn.Linear) and not isinstance(fp8.head.proj, FP8Linear)  # kept high
    err = rel_err(out, ref)
    assert 1e-3 < err < 0.1, err
    assert fp8.precision == "fp8" and to_fp8(fp8) is fp8  # idempotent
    with pytest.raises(ValueError, match="precision='int4' is not one of bf16, fp8"):
        set_precision(model, "int4")
    with pytest.raises(ValueError, match="already FP8"):
        set_precision(fp8, "bf16")


def test_fp8_linears_read_inputs_quantised_in_the_norm_pass(monkeypatch):
    """The block's adaLN / LayerNorm passes and the FFN's GELU hand the FP8 linears e4m3 inputs
    (ops.*_fp8): the separate quantisations left are the attention outputs' (the o
    projections') and the text context's (cross-attention's k, v). The function is the one of
    quantising the fp32 norm outputs separately."""
    from flgengine import ops
    from flgengine.model import precision as P

    cfg = tiny_config(num_heads=2, head_dim=16, ffn_dim=48, num_layers=3)
    torch.manual_seed(0)
    model = to_fp8(DiT(cfg).eval())
    model.backend = "ref"
    x, t, ctx = _inputs(cfg)
    calls = []
    for name in ("adaln_modulate_fp8", "gated_residual_adaln_fp8", "gelu_fp8"):
        monkeypatch.setattr(ops, name, lambda *a, _f=getattr(ops, name), _n=name, **k: calls.append(_n) or _f(*a, **k))
    separate = []
    init = QuantizedTokens.__init__
    monkeypatch.setattr(QuantizedTokens, "__init__", lambda self, x: separate.append(tuple(x.shape)) or init(self, x))
    with torch.no_grad():
        fused = model(x, t, ctx)
    n = cfg.num_layers
    assert calls.count("adaln_modulate_fp8") == 1 and calls.count("gelu_fp8") == n
    assert calls.count("gated_residual_adaln_fp8") == 3 * n - 1  # cross-attention's and the FFN's norms, later blocks' self-attention's
    tokens = x.shape[2] * x.shape[3] * x.shape[4] // 4  # 2 x 2 patches
    # per block: self-attention's output, the context, cross-attention's output
    assert separate == [(2, tokens, cfg.dim), (2, 5, cfg.dim), (2, tokens, cfg.dim)] * n
    # the same function as the unfused producers (the norm's fp32 output, then quantised)
    monkeypatch.undo()
    monkeypatch.setattr(P, "modulate_for", lambda lin, *a: QuantizedTokens(ops.adaln_modulate(*a).float()))
    monkeypatch.setattr(P, "gelu_for", lambda lin, h: QuantizedTokens(torch.nn.functional.gelu(h.float(), approximate="tanh")))
    import flgengine.model.dit as dit_module

    monkeypatch.setattr(dit_module, "modulate_for", P.modulate_for)
    monkeypatch.setattr(dit_module, "gelu_for", P.gelu_for)
    monkeypatch.setattr(dit_module, "residual_modulate_for",
                        lambda lin, *a: (lambda xn, h: (xn, QuantizedTokens(h)))(*ops.gated_residual_adaln(*a)))
    with torch.no_grad():
        unfused = model(x, t, ctx)
    assert torch.equal(fused, unfused)


def test_block_mask_in_the_model():
    cfg = tiny_config(num_heads=2, head_dim=16, ffn_dim=48, num_layers=2)
    torch.manual_seed(0)
    model = DiT(cfg).eval()
    x, t, ctx = _inputs(cfg, F=4, H=8, W=8)  # 4 x 4 x 4 = 64 tokens
    with torch.no_grad():
        dense = model(x, t, ctx)
        model.block_mask = BlockMask(torch.ones(1, 4, 4, dtype=torch.bool), 64, 64, 16, 16)
        assert_close(model(x, t, ctx), dense, 1e-5, "an all-True mask")
        seen = []
        model.block_mask = lambda grid: seen.append(grid) or random_block_mask(2, 64, 64, 0.5, 16, 16)
        sparse = model(x, t, ctx)
    assert seen == [(4, 4, 4)]
    assert rel_err(sparse, dense) > 1e-3  # the mask changes the function
    model.block_mask = random_block_mask(2, 63, 63, 0.5, 16, 16)
    with pytest.raises(ValueError, match="q_len=63"):
        model(x, t, ctx)


@pytest.mark.gpu
def test_gpu_fp8_model_matches_the_emulation():
    cfg = tiny_config(num_heads=2, head_dim=64, ffn_dim=256, num_layers=2, text_dim=64)
    torch.manual_seed(0)
    cpu = to_fp8(DiT(cfg).cast(torch.bfloat16).eval())
    gpu = copy.deepcopy(cpu).cuda()
    x, t, ctx = _inputs(cfg, F=2, H=16, W=16)
    with torch.no_grad():
        a = gpu(x.cuda().bfloat16(), t.cuda(), ctx.cuda().bfloat16()).float().cpu()
        b = cpu(x.bfloat16(), t, ctx.bfloat16()).float()
    assert_close(a, b, 5e-2, "FP8 on tensor cores vs emulated")


def test_fp8_bundles_store_e4m3_and_load_without_a_bf16_copy(tmp_path):
    from safetensors.torch import load_file, save_file

    from flgengine.bundle import BundleError, load_bundle, save_bundle

    cfg = tiny_config(num_heads=2, head_dim=16, ffn_dim=48, num_layers=2)
    torch.manual_seed(0)
    model = DiT(cfg).eval()
    save_bundle(tmp_path / "fp32", model)
    save_bundle(tmp_path / "fp8", model, storage_dtype=torch.float8_e4m3fn)
    stored = load_file(tmp_path / "fp8" / "model.safetensors")
    assert stored["blocks.0.ffn.fc1.weight"].dtype == torch.float8_e4m3fn
    assert stored["blocks.0.ffn.fc1.weight_scale"].shape == (48, 1)
    assert stored["head.proj.weight"].dtype == torch.float32  # kept high
    x, t, ctx = _inputs(cfg)
    direct = load_bundle(tmp_path / "fp8", precision="fp8").model
    fc1 = direct.blocks[0].ffn.fc1
    assert isinstance(fc1, FP8Linear) and fc1.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(fc1.weight.float(), stored["blocks.0.ffn.fc1.weight"].float())  # the stored e4m3, no copy
    requant = load_bundle(tmp_path / "fp32", precision="fp8").model  # quantised at load from fp32
    with torch.no_grad():
        assert_close(direct(x, t, ctx), requant(x, t, ctx), 1e-6, "stored e4m3 vs quantised at load")
        dequant = load_bundle(tmp_path / "fp8").model  # precision bf16: dequantised
        assert not isinstance(dequant.blocks[0].ffn.fc1, FP8Linear)
        assert 1e-3 < rel_err(dequant(x, t, ctx), model(x, t, ctx)) < 0.1
    # FP8 through casts: .to(dtype) keeps e4m3 weights and fp32 scales
    direct.cast(torch.bfloat16)
    assert fc1.weight.dtype == torch.float8_e4m3fn and fc1.weight_scale.dtype == torch.float32
    assert fc1.bias.dtype == torch.bfloat16
    # missing / non-finite scales are refused at load
    for mutate, match in ((lambda s: s.pop("blocks.1.self_attn.q.weight_scale"), "has no scales"),
                          (lambda s: s["blocks.1.self_attn.q.weight_scale"].fill_(float("inf")), "non-finite"),
                          (lambda s: s["blocks.1.self_attn.q.weight_scale"].fill_(0.0), "non-positive"),
                          (lambda s: s.__setitem__("head.proj.weight", s["head.proj.weight"].to(torch.float8_e4m3fn)),
                           "only the block linears")):
        bad = dict(stored)
        bad = {k: v.clone() for k, v in bad.items()}
        mutate(bad)
        save_file(bad, tmp_path / "fp8" / "model.safetensors")
        with pytest.raises(BundleError, match=match):
            load_bundle(tmp_path / "fp8", precision="fp8")


def test_hunyuan_fp8_quantises_both_block_kinds_and_stores_them_e4m3(tmp_path):
    """FP8 is the family's blocks' choice (`fp8_linears`): a HunyuanVideo DiT gets every linear
    of its dual- and single-stream blocks in e4m3 (attention stays in its dtype), stores and
    loads them e4m3, and computes close to its bf16 self."""
    from flgengine.bundle import load_bundle, save_bundle
    from flgengine.model.hunyuan import HunyuanVideoConfig, HunyuanVideoDiT, pack_text

    cfg = HunyuanVideoConfig(in_channels=4, out_channels=4, num_heads=2, head_dim=16, num_layers=1,
                             num_single_layers=2, num_refiner_layers=1, text_dim=12, pooled_dim=6, rope_axes=(4, 6, 6),
                             guidance_embed=False)
    torch.manual_seed(0)
    model = HunyuanVideoDiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 2, 8, 8, generator=g), torch.tensor([700.0, 300.0])
    text = pack_text(torch.randn(2, 5, 12, generator=g), torch.ones(2, 5, dtype=torch.int64), torch.randn(2, 6, generator=g))
    fp8 = set_precision(copy.deepcopy(model), "fp8")
    assert [sum(isinstance(m, FP8Linear) for m in b.modules()) for b in fp8.blocks] == [12, 5, 5]
    with torch.no_grad():
        ref, out = model(x, t, text), fp8(x, t, text)
    assert 1e-3 < rel_err(out, ref) < 0.1
    save_bundle(tmp_path / "fp8", model, storage_dtype=torch.float8_e4m3fn)
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "fp8" / "model.safetensors")
    assert {k for k, v in stored.items() if v.dtype == torch.float8_e4m3fn} == {
        f"blocks.{i}.{n}.weight" for i, b in enumerate(model.blocks) for n in b.fp8_linears}
    loaded = load_bundle(tmp_path / "fp8", precision="fp8").model
    with torch.no_grad():
        assert_close(loaded(x, t, text), out, 1e-6, "stored e4m3 vs quantised at load")
