"""Block-sparse and FP8 attention, and FP8 GEMMs, at the Wan-1.3B 480p x 81-frame shape
(32760 tokens, 12 heads x 128, width 1536, FFN 8960). GPU only (`gpu` marker).

Every figure is a ratio measured in one run against a baseline timed in the same process:
- block-sparse attention at densities 1.0 / 0.5 / 0.25 / 0.1 (128 x 128 tiles, one random
  pattern per head with the diagonal tile kept): our Triton kernel against our dense kernel,
  torch SDPA (its best backend) and FlexAttention with the same block mask;
- FP8 attention (e4m3 Q/K/V/P, K smoothed; `flgengine/ops/fp8.py`) against our bf16 kernel,
  with and without the quantisation pass, and its error against the bf16 kernel;
- FP8 GEMMs (`torch._scaled_mm`, per-token activation and per-channel weight scales, bf16 out)
  against bf16 `F.linear` at each of the DiT's linear shapes, with and without the dynamic
  quantisation of the activation;
- the FP8 linears' inputs made in the pass before them (`ops.gated_residual_adaln_fp8`,
  `ops.gelu_fp8`) against the two passes they replace (the bf16 op, then the Triton per-token
  quantisation), as a fraction of the copy bandwidth the fused pass's bytes would take.
Rates: attention FLOPs 4 x H x Sq x Skv x D x density; GEMM 2 x M x K x N.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flgengine import ops
from flgengine.ops.block_mask import random_block_mask
from timing import median_seconds

pytestmark = pytest.mark.gpu

S, H = 32760, 12


def _qkv(D: int, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(1, S, H, D, generator=g, device="cuda", dtype=torch.float32).to(dtype) for _ in range(3))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _line(benchmark, text: str, **info):
    benchmark.extra_info.update(info)
    print("\n" + text)


@pytest.mark.parametrize("D", [128, 72])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.25, 0.1])
def test_block_sparse_attention(benchmark, D, density):
    q, k, v = _qkv(D)
    bm = random_block_mask(H, S, S, density, 128, 128, seed=1, device="cuda")
    dense = median_seconds(lambda: ops.attention(q, k, v, backend="triton"), q.device, repeat=5)
    sdpa = median_seconds(lambda: ops.attention(q, k, v, backend="ref"), q.device, repeat=5)
    ours = median_seconds(lambda: ops.attention(q, k, v, block_mask=bm, backend="triton"), q.device, repeat=5)
    out = ops.attention(q, k, v, block_mask=bm, backend="triton")
    try:
        flex_out = ops.attention(q, k, v, block_mask=bm, backend="flex")  # compiles once
        flex = median_seconds(lambda: ops.attention(q, k, v, block_mask=bm, backend="flex"), q.device, repeat=5)
        flex_err = _rel(out, flex_out)
    except Exception as e:  # FlexAttention missing or failing on this torch: say so, keep ours
        flex, flex_err = float("nan"), repr(e)[:200]
    benchmark.pedantic(lambda: ops.attention(q, k, v, block_mask=bm, backend="triton"), rounds=3, iterations=1,
                       warmup_rounds=1)
    dens = bm.density()
    tflops = 4 * H * S * S * D * dens / ours / 1e12
    _line(benchmark, f"sparse attention D={D} density {dens:.3f}: {ours * 1e3:.2f} ms ({tflops:.0f} TFLOP/s), "
                     f"{dense / ours:.2f}x our dense ({dense * 1e3:.2f} ms), {sdpa / ours:.2f}x SDPA ({sdpa * 1e3:.2f} ms), "
                     f"{flex / ours:.2f}x FlexAttention ({flex * 1e3:.2f} ms, rel diff {flex_err})",
          head_dim=D, density=dens, seconds=ours, dense_seconds=dense, sdpa_seconds=sdpa, flex_seconds=flex,
          speedup_vs_dense=dense / ours, speedup_vs_flex=flex / ours, flex_rel_diff=flex_err, TFLOPs=tflops)


@pytest.mark.parametrize("D", [128, 72])
@pytest.mark.parametrize("density", [1.0, 0.25])
def test_fp8_attention(benchmark, D, density):
    q, k, v = _qkv(D)
    bm = None if density == 1.0 else random_block_mask(H, S, S, density, 128, 128, seed=1, device="cuda")
    bf16 = median_seconds(lambda: ops.attention(q, k, v, block_mask=bm, backend="triton"), q.device, repeat=5)
    fp8 = median_seconds(lambda: ops.attention(q, k, v, block_mask=bm, precision="fp8", backend="triton"), q.device,
                         repeat=5)
    from flgengine.ops.triton import attention as T
    from flgengine.ops.triton.quantize import quantize_attention

    cfg = T.config(D, q.dtype, interpret=False, fp8=True)  # the Triton quantisation pass the kernel runs first
    quant = median_seconds(lambda: quantize_attention(q, k, v, cfg["BLOCK_M"], cfg["BLOCK_N"], pad_kv=16), q.device,
                           repeat=5)
    out8 = ops.attention(q, k, v, block_mask=bm, precision="fp8", backend="triton")
    out16 = ops.attention(q, k, v, block_mask=bm, backend="triton")
    err = _rel(out8, out16)
    cos = F.cosine_similarity(out8.float().flatten(), out16.float().flatten(), dim=0).item()
    benchmark.pedantic(lambda: ops.attention(q, k, v, block_mask=bm, precision="fp8", backend="triton"), rounds=3,
                       iterations=1, warmup_rounds=1)
    kernel = fp8 - quant
    _line(benchmark, f"fp8 attention D={D} density {density}: {fp8 * 1e3:.2f} ms with quantisation "
                     f"({quant * 1e3:.2f} ms of it), {bf16 / fp8:.2f}x our bf16 ({bf16 * 1e3:.2f} ms); "
                     f"kernel alone {bf16 / kernel:.2f}x; rel err vs bf16 {err:.4f}, cosine {cos:.5f}",
          head_dim=D, density=density, seconds=fp8, quant_seconds=quant, bf16_seconds=bf16, speedup=bf16 / fp8,
          kernel_speedup=bf16 / kernel, rel_err_vs_bf16=err, cosine_vs_bf16=cos)


# (name, in features, out features) of the DiT's linears at width 1536, FFN 8960
GEMMS = [("qkv/o/cross-q", 1536, 1536), ("ffn-up", 1536, 8960), ("ffn-down", 8960, 1536)]


@pytest.mark.parametrize("name,K,N", GEMMS, ids=[g[0] for g in GEMMS])
def test_fp8_gemm(benchmark, name, K, N):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(S, K, generator=g, device="cuda").to(torch.bfloat16)
    w = (torch.randn(N, K, generator=g, device="cuda") / K**0.5).to(torch.bfloat16)
    b = torch.randn(N, generator=g, device="cuda").to(torch.bfloat16)
    w_scale = (w.float().abs().amax(1, keepdim=True) / 448).clamp_min(1e-12)  # (N, 1) per output channel
    w8 = (w.float() / w_scale).to(torch.float8_e4m3fn)  # (N, K) row-major = K-major B operand

    def quant(x):  # dynamic per-token scales
        s = (x.float().abs().amax(1, keepdim=True) / 448).clamp_min(1e-12)
        return (x.float() / s).to(torch.float8_e4m3fn), s

    x8, x_scale = quant(x)

    def mm(x8, xs, fast):
        return torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=w_scale.t(), bias=b, out_dtype=torch.bfloat16,
                                use_fast_accum=fast)

    t16 = median_seconds(lambda: F.linear(x, w, b), x.device)
    t8 = median_seconds(lambda: mm(x8, x_scale, False), x.device)
    t8f = median_seconds(lambda: mm(x8, x_scale, True), x.device)
    t8q = median_seconds(lambda: mm(*quant(x), True), x.device)
    err = _rel(mm(x8, x_scale, True), F.linear(x.float(), w.float(), b.float()))
    benchmark.pedantic(lambda: mm(x8, x_scale, True), rounds=5, iterations=1, warmup_rounds=1)
    flops = 2 * S * K * N
    _line(benchmark, f"fp8 gemm {name} {S}x{K}x{N}: bf16 {t16 * 1e6:.0f} us ({flops / t16 / 1e12:.0f} TFLOP/s), "
                     f"fp8 {t8 * 1e6:.0f} us ({t16 / t8:.2f}x), fast-accum {t8f * 1e6:.0f} us ({t16 / t8f:.2f}x, "
                     f"{flops / t8f / 1e12:.0f} TFLOP/s), with torch quantisation {t8q * 1e6:.0f} us ({t16 / t8q:.2f}x); "
                     f"rel err {err:.4f}",
          M=S, K=K, N=N, bf16_seconds=t16, fp8_seconds=t8, fp8_fast_seconds=t8f, fp8_quant_seconds=t8q,
          speedup=t16 / t8, speedup_fast=t16 / t8f, speedup_with_quant=t16 / t8q, rel_err=err)


@pytest.mark.parametrize("op", ["gated_residual_adaln", "gelu"])
def test_fp8_producers(benchmark, op):
    import ceilings
    from flgengine.ops.triton.quantize import quantize_tokens

    g = torch.Generator(device="cuda").manual_seed(0)
    D = 1536 if op == "gated_residual_adaln" else 8960
    x = torch.randn(1, S, D, generator=g, device="cuda").to(torch.bfloat16)
    if op == "gated_residual_adaln":
        y = torch.randn(1, S, D, generator=g, device="cuda").to(torch.bfloat16)
        gate, scale, shift = (torch.randn(1, 6, 1536, generator=g, device="cuda").unbind(1)[i] for i in (2, 1, 0))
        fused = lambda: ops.gated_residual_adaln_fp8(x, y, gate, scale, shift, backend="triton")  # noqa: E731
        two = lambda: quantize_tokens(ops.gated_residual_adaln(x, y, gate, scale, shift, backend="triton")[1][0])  # noqa: E731
        moved = x.numel() * (2 + 2 + 2 + 1)  # x, y read; x_new bf16 and h e4m3 written
    else:
        fused = lambda: ops.gelu_fp8(x, backend="triton")  # noqa: E731
        two = lambda: quantize_tokens(F.gelu(x, approximate="tanh")[0])  # noqa: E731
        moved = x.numel() * (2 + 1)
    t_fused = median_seconds(fused, x.device)
    t_two = median_seconds(two, x.device)
    a, b = fused(), two()
    h8, hs = a[-2], a[-1]
    err = _rel(h8.float() * hs, (b[0].float() * b[1]).view(h8.shape))
    benchmark.pedantic(fused, rounds=5, iterations=1, warmup_rounds=1)
    bw = ceilings.measured("cuda")["copy_GBps"] * 1e9  # the card's copy bandwidth, measured now
    _line(benchmark, f"fp8 producer {op} {S}x{D}: fused {t_fused * 1e6:.0f} us ({moved / t_fused / bw:.0%} of copy), "
                     f"two passes {t_two * 1e6:.0f} us: {t_two / t_fused:.2f}x; rel diff {err:.4f}",
          op=op, D=D, fused_seconds=t_fused, two_pass_seconds=t_two, speedup=t_two / t_fused,
          fraction_of_copy=moved / t_fused / bw, rel_diff=err)


def test_dit_4step_loop(benchmark):
    """The 30%-block-pruned Wan2.1-1.3B-shaped student's 4-step loop (4 DiT forwards + Euler
    updates, no CFG, 480p x 81 frames, 512 text tokens, random weights), bf16 and FP8, dense and
    with a block mask of density 0.25 on self-attention (random tiles: the time depends on the
    density, not on which tiles)."""
    from test_bench_dit import WAN_1_3B, WAN_LATENT, _keep_70_percent

    from flgengine.config import ModelConfig
    from flgengine.model import DiT
    from flgengine.model.precision import to_fp8

    cfg = ModelConfig(**WAN_1_3B, block_ids=_keep_70_percent(WAN_1_3B["num_layers"]))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DiT(cfg).cast(torch.bfloat16).eval()
    x = torch.randn(WAN_LATENT, device="cuda", dtype=torch.bfloat16)
    ctx = torch.randn(1, 512, cfg.text_dim, device="cuda", dtype=torch.bfloat16)
    masks = {}

    def sparse(grid):  # one mask per grid, built once
        if grid not in masks:
            n = grid[0] * grid[1] * grid[2]
            masks[grid] = random_block_mask(cfg.num_heads, n, n, 0.25, 128, 128, seed=1, device="cuda")
        return masks[grid]

    def loop():
        z = x
        for t in (1000.0, 750.0, 500.0, 250.0):
            z = z - 0.25 * model(z, torch.tensor([t], device="cuda"), ctx)
        return z

    results, outs = {}, {}
    with torch.no_grad():
        for precision in ("bf16", "fp8"):
            if precision == "fp8":
                to_fp8(model)
            for name, mask in (("dense", None), ("sparse0.25", sparse)):
                model.block_mask = mask
                key = f"{precision}-{name}"
                results[key] = median_seconds(loop, x.device, repeat=3, warmup=1)
                outs[key] = model(x, torch.tensor([500.0], device="cuda"), ctx).float()
        benchmark.pedantic(loop, rounds=1, iterations=1)
    base = results["bf16-dense"]
    err = {k: _rel(v, outs["bf16-dense"]) for k, v in outs.items()}
    _line(benchmark, "DiT 4-step loop, Wan-1.3B 30% pruned, 480p x 81: " + ", ".join(
        f"{k} {v:.3f} s ({base / v:.2f}x, forward rel diff vs bf16-dense {err[k]:.3f})" for k, v in results.items()),
          seconds=results, speedup=base and {k: base / v for k, v in results.items()}, rel_diff=err,
          blocks=len(cfg.kept_blocks))
