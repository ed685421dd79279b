"""The fused ops per backend: GB/s (elementwise ops) or TFLOP/s (attention), the ratio to
the reference backend (for attention the reference *is* torch SDPA with its best
backend), measured in one run; on a GPU also the fraction of the card's measured ceiling
(bench/ceilings.py: copy bandwidth, bf16 matmul).

CPU: small shapes, the C++ backend. GPU (`gpu` marker): the Wan-1.3B 480p x 81-frame
shape (32760 tokens x 1536, 12 heads x 128) for `cuda` and `triton`; attention also at
the irregular head dims pruning leaves (40, 72, 96, 112).

Bytes counted: every tensor read once and every output written once (modulation vectors
included); FLOPs of attention: 4 x B x H x Sq x Skv x D.
"""

import pytest
import torch

from flgengine import ops
from flgengine.model.embed import rope_3d
from timing import median_seconds

WAN = (1, 32760, 1536)
WAN_GRID = (21, 30, 52)  # 32760 tokens


def _elementwise_inputs(op: str, shape, dtype, device):
    B, S, D = shape
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s, dt=dtype: torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dt)  # noqa: E731
    mod = rnd(B, 6, D, dt=torch.float32)  # per-sample modulation, as the model's unbind views
    if op == "adaln_modulate":
        args = (rnd(B, S, D), mod[:, 1], mod[:, 0])
        nbytes = 2 * B * S * D * dtype.itemsize + 2 * B * D * 4
    elif op == "gated_residual_adaln":
        args = (rnd(B, S, D), rnd(B, S, D), mod[:, 2], mod[:, 4], mod[:, 3])
        nbytes = 4 * B * S * D * dtype.itemsize + 3 * B * D * 4
    else:  # qk_norm_rope: 12 heads x 128 at Wan's width, on the token grid's RoPE tables
        H = 12 if D == 1536 else 4
        grid = WAN_GRID if S == 32760 else (S // 64, 8, 8)
        cos, sin = rope_3d(D // H, grid, 10000.0, 1024, device)
        args = (rnd(B, S, D), rnd(B, S, D), rnd(D, dt=torch.float32), rnd(D, dt=torch.float32), cos, sin, H)
        nbytes = 4 * B * S * D * dtype.itemsize + 2 * cos.numel() * 4
    return args, nbytes


def _run(op: str, args, backend: str):
    fn = getattr(ops, op)
    return lambda: fn(*args, backend=backend)


def _report(benchmark, what: str, backend: str, t: float, t_ref: float, work: float, unit: str, device, ceiling_key: str):
    rate = work / t
    info = {"backend": backend, "seconds": t, "ref_seconds": t_ref, "speedup_vs_ref": t_ref / t, unit: rate}
    line = f"\n{what} {backend}: {t * 1e6:.1f} us, {rate:.1f} {unit}, {t_ref / t:.2f}x the reference ({t_ref * 1e6:.1f} us)"
    if device.type == "cuda":
        import ceilings

        ceil = ceilings.measured("cuda")
        frac = rate / ceil[ceiling_key]
        info.update({"ceilings": ceil, "fraction_of_ceiling": frac})
        line += f", {frac:.0%} of the card's {ceiling_key} ({ceil[ceiling_key]:.0f})"
    benchmark.extra_info.update(info)
    print(line)


ELEMENTWISE = [
    pytest.param(op, backend, shape, dtype, id=f"{op}-{backend}-{tag}", marks=marks)
    for op in ("adaln_modulate", "gated_residual_adaln", "qk_norm_rope")
    for backend, shape, dtype, tag, marks in (
        ("cpu", (1, 2048, 512), torch.float32, "2048x512-fp32", ()),
        ("cuda", WAN, torch.bfloat16, "wan480p-bf16", pytest.mark.gpu),
        ("triton", WAN, torch.bfloat16, "wan480p-bf16", pytest.mark.gpu),
        ("cuda", WAN, torch.float32, "wan480p-fp32", pytest.mark.gpu),
    )
]


@pytest.mark.parametrize("op,backend,shape,dtype", ELEMENTWISE)
def test_elementwise_op(benchmark, op, backend, shape, dtype):
    device = torch.device("cpu" if backend == "cpu" else "cuda")
    args, nbytes = _elementwise_inputs(op, shape, dtype, device)
    tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
    try:
        ops.registry.pick(op, tensors, backend)
    except ops.BackendUnavailable as e:
        pytest.skip(str(e))
    t_ref = median_seconds(_run(op, args, "ref"), device)
    t = median_seconds(_run(op, args, backend), device)
    benchmark.pedantic(_run(op, args, backend), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({"op": op, "shape": list(shape), "dtype": str(dtype), "bytes": nbytes})
    _report(benchmark, f"{op} {tuple(shape)} {dtype}", backend, t, t_ref, nbytes / 1e9, "GBps", device, "copy_GBps")


ATTENTION = [
    pytest.param(backend, H, D, S, S_kv, dtype, id=f"attention-{backend}-{H}x{D}-{S}x{S_kv}", marks=marks)
    for backend, H, D, S, S_kv, dtype, marks in (
        ("cpu", 2, 40, 256, 256, torch.float32, ()),
        ("cpu", 2, 72, 256, 16, torch.float32, ()),
        *((b, 12, 128, 32760, 32760, torch.bfloat16, pytest.mark.gpu) for b in ("cuda", "triton")),
        *((b, 12, 128, 32760, 512, torch.bfloat16, pytest.mark.gpu) for b in ("cuda", "triton")),  # cross-attention
        *((b, H, D, 32760, 32760, torch.bfloat16, pytest.mark.gpu)
          for b in ("cuda", "triton") for H, D in ((12, 40), (12, 72), (12, 96), (12, 112))),
    )
]


@pytest.mark.parametrize("backend,H,D,S,S_kv,dtype", ATTENTION)
def test_attention(benchmark, backend, H, D, S, S_kv, dtype):
    device = torch.device("cpu" if backend == "cpu" else "cuda")
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, S, H, D, generator=g, device=device).to(dtype)
    k, v = (torch.randn(1, S_kv, H, D, generator=g, device=device).to(dtype) for _ in range(2))
    try:
        ops.registry.pick("attention", (q, k, v), backend)
    except ops.BackendUnavailable as e:
        pytest.skip(str(e))
    repeat = 5 if device.type == "cuda" else 10
    t_ref = median_seconds(_run("attention", (q, k, v), "ref"), device, repeat=repeat)  # torch SDPA, best backend
    t = median_seconds(_run("attention", (q, k, v), backend), device, repeat=repeat)
    benchmark.pedantic(_run("attention", (q, k, v), backend), rounds=3, iterations=1, warmup_rounds=1)
    flops = 4 * H * S * S_kv * D
    benchmark.extra_info.update({"op": "attention", "heads": H, "head_dim": D, "S": S, "S_kv": S_kv, "dtype": str(dtype),
                                 "flops": flops})
    _report(benchmark, f"attention {H}x{D} S={S} S_kv={S_kv} {dtype}", backend, t, t_ref, flops / 1e12, "TFLOPs",
            device, "matmul_TFLOPs")
