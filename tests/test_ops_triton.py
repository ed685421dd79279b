"""The Triton backend (flgengine/ops/triton) against the reference ops (flgengine/ops/ref.py).

CPU: the kernels run in Triton's interpreter. The `interpreter` fixture sets
TRITON_INTERPRET=1 only for the test: the backend decides compiled vs interpreted per call
(see flgengine/ops/triton/_common.py), so nothing depends on when the kernel modules were
first imported and the rest of the suite is unaffected. The interpreter costs ~5 ms per
program instance and per loop iteration, so shapes are small and odd (masks, tails).
GPU (`gpu` marker, skipped without CUDA): the compiled kernels at the odd shapes, at the
Wan-1.3B 480p production shape (32760 tokens x 1536, 12 heads x 128) and at pruned head dims.

Tolerance: at most 2x the error the reference itself makes in the kernel's dtype (both
measured against the reference on float64 inputs), with a per-dtype floor.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flgengine import ops
from flgengine.ops import ref, registry
from flgengine.ops import triton as tri
from flgengine.ops.triton import _common
from helpers import assert_close, rel_err

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FLG_BACKEND", raising=False)
    if importlib.util.find_spec("triton") is not None and _common.import_error() is None and _common.interpreter_reason():
        # tests/conftest.py turns the interpreter on for the session only on machines without
        # CUDA; where CUDA is present triton is imported compiled and the gpu tests run the kernels
        pytest.skip("triton runs compiled in this session (CUDA machine): the gpu tests cover the kernels")


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FLG_BACKEND", raising=False)


def _nonzero(*shape, dtype=torch.float32, device="cpu"):
    x = torch.randn(*shape, dtype=torch.float64, device=device)
    return (x + 0.1 * x.sign() + (x == 0)).to(dtype)  # never zero


def _tol(dtype, ref_lo, expect) -> float:
    return max(2 * rel_err(ref_lo, expect), FLOOR[dtype])


def _f64(*ts):
    return tuple(t.double() for t in ts)


# ---- modulation layouts the model produces --------------------------------------------------

def _mod(kind: str, B: int, S: int, D: int, dtype, device, k: int = 0, mul: float = 1.0):
    """A scale / shift / gate (values times `mul`) of one layout: 'sample' (B, D) contiguous,
    'sample_view' (B, D) unbind view of a (B, 6, D), 'token_view' (B, S, D) unbind view of a
    (B, S, 6, D), 'vector' a (D,) expanded to (B, D) (stride 0), 'token_bcast' (B, 1, D)
    expanded to (B, S, D), 'token' (B, S, D) contiguous, 'ones' torch.ones(1, D).expand(B, D)."""
    rnd = lambda *shape: (_nonzero(*shape, device=device) * mul).to(dtype)  # noqa: E731
    if kind == "sample":
        m = rnd(B, D)
    elif kind == "sample_view":
        m = rnd(B, 6, D).unbind(1)[k]
    elif kind == "token_view":
        m = rnd(B, S, 6, D).unbind(2)[k]
    elif kind == "vector":
        m = rnd(D).expand(B, D)
    elif kind == "token_bcast":
        m = rnd(B, 1, D).expand(B, S, D)
    elif kind == "token":
        m = rnd(B, S, D)
    elif kind == "ones":
        m = torch.ones(1, D, dtype=dtype, device=device).expand(B, D)
    else:
        raise ValueError(kind)
    # the layout is the one named (a (D,) expanded to (1, D) is contiguous: B = 1 cannot tell them apart)
    contiguous = kind in ("sample", "token") or (B == 1 and kind in ("vector", "ones"))
    assert contiguous == (m.stride() == torch.empty(m.shape).stride()), (kind, m.stride())
    return m


def _x(B, S, D, dtype, device, layout="contiguous"):
    if layout == "contiguous":
        return (_nonzero(B, S, D, device=device) * 2 + 0.5).to(dtype)
    if layout == "transposed":  # channel stride S
        return (_nonzero(B, D, S, device=device) * 2 + 0.5).to(dtype).transpose(1, 2)
    if layout == "sliced":  # a slice of a wider row (fused projection output)
        return (_nonzero(B, S, 3 * D, device=device) * 2 + 0.5).to(dtype)[..., D:2 * D]
    raise ValueError(layout)


# ---- the checks, shared by the CPU (interpreter) and GPU tests ------------------------------

def check_adaln_modulate(B, S, D, dtype, x_layout, mod_kind, mod_dtype, device):
    x = _x(B, S, D, dtype, device, x_layout)
    mdt = dtype if mod_dtype == "x" else torch.float32
    scale = _mod(mod_kind, B, S, D, mdt, device, 1, mul=0.5)
    shift = _mod(mod_kind, B, S, D, mdt, device, 0)
    out = ops.adaln_modulate(x, scale, shift, 1e-6, backend="triton")
    assert out.dtype == dtype and out.shape == (B, S, D) and out.is_contiguous()
    expect = ref.adaln_modulate(*_f64(x, scale, shift), 1e-6)
    tol = _tol(dtype, ref.adaln_modulate(x, scale, shift, 1e-6), expect)
    assert_close(out, expect, tol, f"adaln_modulate {dtype} {(B, S, D)} x={x_layout} mod={mod_kind}/{mod_dtype}")


def check_gated_residual_adaln(B, S, D, dtype, x_layout, kinds, device):
    gate_kind, scale_kind, shift_kind = kinds
    x = _x(B, S, D, dtype, device, x_layout)
    y = _x(B, S, D, dtype, device, "contiguous" if x_layout == "transposed" else "transposed")
    gate = _mod(gate_kind, B, S, D, torch.float32, device, 2)
    scale = _mod(scale_kind, B, S, D, torch.float32, device, 4, mul=0.5)
    shift = _mod(shift_kind, B, S, D, dtype, device, 3)
    x_new, h = ops.gated_residual_adaln(x, y, gate, scale, shift, 1e-6, backend="triton")
    for t in (x_new, h):
        assert t.dtype == dtype and t.shape == (B, S, D) and t.is_contiguous()
    ex_x, ex_h = ref.gated_residual_adaln(*_f64(x, y, gate, scale, shift), 1e-6)
    lo_x, lo_h = ref.gated_residual_adaln(x, y, gate, scale, shift, 1e-6)
    what = f"gated_residual_adaln {dtype} {(B, S, D)} x={x_layout} gate/scale/shift={kinds}"
    assert_close(x_new, ex_x, _tol(dtype, lo_x, ex_x), what + " x_new")
    assert_close(h, ex_h, _tol(dtype, lo_h, ex_h), what + " h")


def _rope_tables(S, half, device, layout="contiguous"):
    theta = torch.rand(S, half, dtype=torch.float64, device=device) * 2 * math.pi
    cos, sin = theta.cos().float(), theta.sin().float()
    if layout == "strided":  # every other column of a wider table
        cos = torch.stack([cos, torch.ones_like(cos)], -1).flatten(-2)[:, ::2]
        sin = torch.stack([sin, torch.zeros_like(sin)], -1).flatten(-2)[:, ::2]
        assert cos.stride() == (2 * half, 2)
    return cos, sin


def check_qk_norm_rope(B, S, H, Dh, dtype, layout, w_dtype, device, cos_sin=None):
    N = H * Dh
    if layout == "fused":  # q, k: slices of one (B, S, 3N) projection
        qkv = _nonzero(B, S, 3 * N, device=device).to(dtype)
        q, k = qkv[..., :N], qkv[..., N:2 * N]
    elif layout == "transposed":  # (S, B, N) storage
        q = _nonzero(S, B, N, device=device).to(dtype).transpose(0, 1)
        k = _nonzero(S, B, N, device=device).to(dtype).transpose(0, 1)
    else:
        q, k = _nonzero(B, S, N, device=device).to(dtype), (_nonzero(B, S, N, device=device) * 3).to(dtype)
    wdt = dtype if w_dtype == "x" else torch.float32
    qw, kw = (1 + 0.3 * _nonzero(N, device=device)).to(wdt), (1 + 0.3 * _nonzero(N, device=device)).to(wdt)
    if cos_sin is None:
        cos_sin = _rope_tables(S, Dh // 2, device, "strided" if layout == "transposed" else "contiguous")
    cos, sin = cos_sin
    q_out, k_out = ops.qk_norm_rope(q, k, qw, kw, cos, sin, H, 1e-6, backend="triton")
    for t in (q_out, k_out):
        assert t.dtype == dtype and t.shape == (B, S, H, Dh) and t.is_contiguous()
    ex_q, ex_k = ref.qk_norm_rope(*_f64(q, k, qw, kw, cos, sin), H, 1e-6)
    lo_q, lo_k = ref.qk_norm_rope(q, k, qw.to(dtype), kw.to(dtype), cos, sin, H, 1e-6)
    what = f"qk_norm_rope {dtype} B={B} S={S} H={H} Dh={Dh} {layout} w={w_dtype}"
    assert_close(q_out, ex_q, _tol(dtype, lo_q, ex_q), what + " q")
    assert_close(k_out, ex_k, _tol(dtype, lo_k, ex_k), what + " k")


def _qkv(B, Sq, Skv, H, D, dtype, device, layout):
    if layout == "contiguous":
        return (_nonzero(B, Sq, H, D, dtype=dtype, device=device), _nonzero(B, Skv, H, D, dtype=dtype, device=device),
                _nonzero(B, Skv, H, D, dtype=dtype, device=device))
    # q stored (B, H, Sq, D) and viewed as (B, Sq, H, D); k, v slices of a packed (B, Skv, 2, H, D)
    q = _nonzero(B, H, Sq, D, dtype=dtype, device=device).transpose(1, 2)
    kv = _nonzero(B, Skv, 2, H, D, dtype=dtype, device=device)
    return q, kv[:, :, 0], kv[:, :, 1]


def check_attention(B, Sq, Skv, H, D, dtype, layout, device):
    q, k, v = _qkv(B, Sq, Skv, H, D, dtype, device, layout)
    assert layout == "contiguous" or not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = ops.attention(q, k, v, backend="triton")
    assert out.dtype == dtype and out.shape == (B, Sq, H, D) and out.is_contiguous()
    expect = ref.attention(*_f64(q, k, v))
    tol = _tol(dtype, ref.attention(q, k, v), expect)
    assert_close(out, expect, tol, f"attention {dtype} B={B} Sq={Sq} Skv={Skv} H={H} D={D} {layout}")


ADALN_CASES = [  # B, S, D, x layout, modulation kind, modulation dtype (fp32 or x's)
    (1, 7, 40, "contiguous", "sample", "fp32"),
    (2, 37, 72, "contiguous", "token_view", "fp32"),
    (2, 13, 24, "transposed", "vector", "x"),
    (1, 9, 112, "sliced", "sample_view", "x"),
    (2, 5, 96, "contiguous", "token_bcast", "fp32"),
]
GATED_CASES = [  # B, S, D, x layout, (gate, scale, shift) kinds
    (1, 7, 40, "contiguous", ("sample", "sample", "sample")),
    (2, 37, 72, "contiguous", ("sample_view", "vector", "vector")),  # the model's cross-attn norm fusion
    (2, 13, 24, "transposed", ("ones", "token_view", "token_view")),  # the model's FFN fusion, per-token
    (1, 9, 112, "sliced", ("token", "token_bcast", "sample")),
]
QK_CASES = [  # B, S, H, Dh, q/k layout, weight dtype
    (1, 7, 1, 40, "contiguous", "fp32"),
    (2, 13, 3, 72, "fused", "x"),
    (1, 9, 2, 112, "transposed", "fp32"),
    (2, 5, 3, 24, "contiguous", "x"),
]
ATTN_CASES = [  # B, Sq, Skv, H, D, layout. Interpreter tiles are 32 x 16: Skv 37 = 2 full K/V
    (1, 37, 37, 2, 40, "contiguous"),  # blocks + a tail of 5; 5 = a tail only; 48 = no tail; 33 = a tail of 1
    (2, 19, 5, 2, 72, "strided"),  # cross-attention, non-contiguous q, k, v
    (1, 7, 48, 1, 112, "contiguous"),
    (1, 33, 33, 2, 24, "strided"),
]


# ---- CPU: the kernels under Triton's interpreter ----------------------------------------------

@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ADALN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_adaln_modulate_matches_reference(interpreter, case, dtype):
    check_adaln_modulate(*case[:3], dtype, *case[3:], device="cpu")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GATED_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gated_residual_adaln_matches_reference(interpreter, case, dtype):
    check_gated_residual_adaln(*case[:3], dtype, *case[3:], device="cpu")


@needs_triton
def test_gated_residual_adaln_normalises_the_rounded_sum(interpreter):
    # bf16 near 256 (ulp 2, or 1 just below): x + y with |y| < half an ulp rounds back to x, so
    # the statistics of the rounded x_new and of the fp32 sum differ, and h shows which were used
    B, S, D = 1, 3, 64
    x = (256 + 2 * torch.randint(-1, 2, (B, S, D))).to(torch.bfloat16)
    y = (0.45 * torch.randint(0, 2, (B, S, D)) * 2 - 0.45).to(torch.bfloat16)
    gate, zero = torch.ones(B, D), torch.zeros(B, D)
    x_new, h = ops.gated_residual_adaln(x, y, gate, zero, zero, 1e-6, backend="triton")
    assert torch.equal(x_new, x)
    expect = ref.gated_residual_adaln(x, y, gate, zero, zero, 1e-6)[1]
    unrounded = F.layer_norm(x.float() + y.float(), (D,), eps=1e-6)  # what a kernel skipping the rounding gets
    assert rel_err(unrounded, expect) > 0.1  # the two are far apart: the check below can tell them apart
    assert_close(h, expect, 1e-2, "h from the rounded x_new")


@needs_triton
@pytest.mark.parametrize("mod_kind", ["sample", "token"])
def test_row_tilings_give_the_same_result(interpreter, mod_kind):
    """The tilings a sweep may choose (rows per tile, tiles per program) change the schedule,
    not the math: 2 samples x 13 tokens (tails in every tiling) against the default launch."""
    from flgengine.ops.triton import adaln_modulate as A
    from flgengine.ops.triton import gated_residual_adaln as G

    B, S, D = 2, 13, 40
    x, y = _x(B, S, D, torch.float32, "cpu", "contiguous"), _x(B, S, D, torch.float32, "cpu", "transposed")
    gate, scale, shift = (_mod(mod_kind, B, S, D, torch.float32, "cpu", i) for i in (2, 1, 0))
    base_a, base_g = A.adaln_modulate(x, scale, shift), G.gated_residual_adaln(x, y, gate, scale, shift)
    for tiling in ({"ROWS": 1, "num_warps": 4}, {"ROWS": 2, "num_warps": 4, "ITERS": 3},
                   {"ROWS": 4, "num_warps": 8, "ITERS": 5}):
        assert_close(A.adaln_modulate(x, scale, shift, tiling=tiling), base_a, 1e-6, f"adaln {tiling}")
        for a, b in zip(G.gated_residual_adaln(x, y, gate, scale, shift, tiling=tiling), base_g):
            assert_close(a, b, 1e-6, f"gated {tiling}")
    with pytest.raises(ValueError, match="ITERS must be >= 1"):
        A.adaln_modulate(x, scale, shift, tiling={"ROWS": 1, "num_warps": 4, "ITERS": 0})
    with pytest.raises(ValueError, match="not tunable"):
        A.adaln_modulate(x, scale, shift, tiling={"ROWS": 1, "num_warps": 4, "BLOCK_D": 64})


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", QK_CASES, ids=lambda c: "-".join(map(str, c)))
def test_qk_norm_rope_matches_reference(interpreter, case, dtype):
    check_qk_norm_rope(*case[:4], dtype, *case[4:], device="cpu")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_attention_matches_reference(interpreter, case, dtype):
    check_attention(*case[:5], dtype, case[5], device="cpu")


@needs_triton
@pytest.mark.parametrize("D,Skv", [(8, 1), (256, 9)])
def test_attention_head_dim_extremes(interpreter, D, Skv):
    # D=8 pads to a 16-wide tile (the dot's minimum), attending to a single key; 256 is the
    # largest head dim served
    check_attention(1, 17, Skv, 1, D, torch.float32, "contiguous", device="cpu")


def test_split_head_dim_covers_the_head_dim_with_fewer_channels():
    from flgengine.ops.triton.attention import split_head_dim

    expect = {8: (16, 0), 16: (16, 0), 24: (32, 0), 40: (32, 16), 64: (64, 0), 72: (64, 16), 80: (64, 16),
              96: (64, 32), 112: (128, 0), 128: (128, 0), 144: (128, 16), 160: (128, 32), 200: (256, 0), 256: (256, 0)}
    assert {d: split_head_dim(d) for d in expect} == expect
    for d in range(8, 257, 8):  # every served head dim: covered, each tile a power of two >= 16, never wider
        da, db = split_head_dim(d)
        assert da + db >= d and da >= 16 and da & (da - 1) == 0 and (db == 0 or (db >= 16 and db & (db - 1) == 0))
        assert da + db <= max(16, 1 << (d - 1).bit_length())


@needs_triton
@pytest.mark.parametrize("D", [40, 72, 96])
def test_attention_split_and_whole_head_dim_tiles_agree(interpreter, D):
    # the same math on 32 + 16 / 64 + 16 / 64 + 32 channels as on one 64 / 128 / 128 tile;
    # cross-attention with a K/V tail, bf16 (P rounded before the second product in both)
    from flgengine.ops.triton import attention as T

    q, k, v = _qkv(2, 19, 21, 2, D, torch.bfloat16, "cpu", "strided")
    assert T.config(D, q.dtype, interpret=True)["BLOCK_DB"] > 0
    split, whole = T.attention(q, k, v), T.attention(q, k, v, tiling={"SPLIT_D": False})
    expect = ref.attention(*_f64(q, k, v))
    assert_close(split, whole, 1e-3, f"split vs whole D={D}")
    assert_close(split, expect, _tol(q.dtype, ref.attention(q, k, v), expect), f"split vs reference D={D}")


# ---- block-sparse and FP8 attention ----------------------------------------------------------

def _fp8_online(q, k, v, block_m, block_n, token_mask=None):
    """The FP8 kernel's algorithm step by step in torch (fp32): the same quantisation
    (`fp8.quantize_attention` with the kernel's tiles), the online softmax over BLOCK_N-key
    blocks, P rounded to e4m3 against the running max. token_mask: bool (Hm, Sq, Skv)."""
    from flgengine.ops import fp8

    B, Sq, H, D = q.shape
    Skv = k.shape[1]
    q8, qs, k8, ks, v8, vs = fp8.quantize_attention(q, k, v, block_m, block_n)
    out = torch.zeros(B, Sq, H, D, device=q.device)
    c = math.log2(math.e) / math.sqrt(D)
    for b in range(B):
        for h in range(H):
            Q, K, V = q8[b, :, h].float(), k8[b, :, h].float(), v8[b, h].float().T  # (S, D)
            for i in range(0, Sq, block_m):
                n = min(block_m, Sq - i)
                m = torch.full((n,), -math.inf, device=q.device)
                l, acc = torch.zeros(n, device=q.device), torch.zeros(n, D, device=q.device)
                for j in range(0, Skv, block_n):
                    qk = Q[i:i + n] @ K[j:j + block_n].T
                    if token_mask is not None:
                        allowed = token_mask[h % token_mask.shape[0], i:i + n, j:j + block_n]
                        if not allowed.any():
                            continue
                        qk = qk.masked_fill(~allowed, -math.inf)
                    sc = c * qs[b, h, i // block_m] * ks[b, h, j // block_n]
                    m_new = torch.maximum(m, qk.amax(1) * sc)
                    p, alpha = torch.exp2(qk * sc - m_new[:, None]), torch.exp2(m - m_new)
                    l = l * alpha + p.sum(1)
                    acc = acc * alpha[:, None] + (p * 448).to(fp8.E4M3).float() @ V[j:j + block_n]
                    m = m_new
                out[b, i:i + n, h] = acc * vs[b, h][None] / (448 * torch.where(l > 0, l, 1.0)[:, None])
    return out.to(q.dtype)


SPARSE_CASES = [  # B, Sq, Skv, H, mask heads, D, density, block (q, k), layout
    (1, 70, 70, 2, 2, 40, 0.5, (32, 32), "contiguous"),  # tails in both; a pruned head dim on split tiles
    (2, 37, 90, 2, 1, 72, 0.4, (32, 32), "strided"),  # cross-shaped, one pattern for all heads
    (1, 64, 64, 1, 1, 64, 1.0, (16, 32), "contiguous"),  # density 1: dense attention; mask blocks > kernel tiles
    (1, 50, 33, 3, 3, 24, 0.3, (16, 16), "strided"),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", SPARSE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_block_sparse_attention_matches_reference(interpreter, case, dtype):
    from flgengine.ops.block_mask import random_block_mask

    B, Sq, Skv, H, Hm, D, density, (bq, bk), layout = case
    q, k, v = _qkv(B, Sq, Skv, H, D, dtype, "cpu", layout)
    bm = random_block_mask(Hm, Sq, Skv, density, bq, bk, seed=3)
    out = ops.attention(q, k, v, block_mask=bm, backend="triton")
    expect = ops.attention(*_f64(q, k, v), block_mask=bm, backend="ref")
    tol = _tol(dtype, ops.attention(q, k, v, block_mask=bm, backend="ref"), expect)
    assert_close(out, expect, tol, f"sparse attention {case} {dtype}")
    if density == 1.0:  # every tile: the dense kernel's result
        assert bm.is_dense
        assert_close(out, ops.attention(q, k, v, backend="triton"), 1e-6, "density 1 vs dense")
    else:  # the mask matters: dense attention is far from it
        assert rel_err(ref.attention(*_f64(q, k, v)), expect) > 0.05


@needs_triton
def test_block_sparse_attention_masked_rows_and_backends(interpreter):
    from flgengine.ops.block_mask import BlockMask

    q, k, v = _qkv(1, 40, 40, 2, 32, torch.float32, "cpu", "contiguous")
    mask = torch.ones(2, 3, 3, dtype=torch.bool)
    mask[0, 1] = False  # head 0's second query block attends to nothing: zeros
    mask[1, :, 2] = False
    bm = BlockMask(mask, 40, 40, 16, 16)
    out = ops.attention(q, k, v, block_mask=bm, backend="triton")
    assert torch.equal(out[0, 16:32, 0], torch.zeros(16, 32))
    expect = ops.attention(*_f64(q, k, v), block_mask=bm, backend="ref")
    assert_close(out, expect, 1e-5, "sparse with an empty row")
    assert_close(ops.attention(q, k, v, block_mask=bm, backend="flex"), expect, 1e-5, "FlexAttention")
    # pairs computed: head 0 all but 16 query rows x 40 keys; head 1 all but 40 queries x the 8-key last block
    assert bm.density() == pytest.approx((2 * 40 * 40 - 16 * 40 - 40 * 8) / (2 * 40 * 40))


def test_block_mask_refuses_bad_input():
    from flgengine.ops.block_mask import BlockMask, random_block_mask

    q, k = torch.randn(1, 40, 2, 32), torch.randn(1, 40, 2, 32)
    with pytest.raises(ValueError, match="block_q=24"):
        BlockMask(torch.ones(1, 2, 2, dtype=torch.bool), 40, 40, 24, 16)
    with pytest.raises(ValueError, match=r"expected \(heads, 3, 3\)"):
        BlockMask(torch.ones(1, 2, 3, dtype=torch.bool), 40, 40, 16, 16)
    with pytest.raises(ValueError, match="bool tensor"):
        BlockMask(torch.ones(1, 3, 3), 40, 40, 16, 16)
    with pytest.raises(ValueError, match="density=0"):
        random_block_mask(1, 40, 40, 0, 16, 16)
    bm = random_block_mask(3, 40, 40, 0.5, 16, 16)
    with pytest.raises(ValueError, match="3 heads; the inputs have H=2"):  # before any backend runs
        ops.attention(q, k, k, block_mask=bm, backend="ref")
    with pytest.raises(ValueError, match="q_len=40, kv_len=40; the inputs have Sq=40, Skv=39"):
        ops.attention(q, k[:, :39], k[:, :39], block_mask=random_block_mask(2, 40, 40, 0.5, 16, 16))
    with pytest.raises(ValueError, match="precision='fp4'"):
        ops.attention(q, k, k, precision="fp4")


@needs_triton
@pytest.mark.parametrize("D,Sq,Skv,H", [(64, 70, 70, 2), (72, 37, 90, 2), (40, 33, 17, 1)])
def test_fp8_attention_is_the_quantised_algorithm(interpreter, D, Sq, Skv, H):
    from flgengine.ops.triton import attention as T

    q, k, v = _qkv(1, Sq, Skv, H, D, torch.bfloat16, "cpu", "strided")
    k = k + 0.5  # an offset in K that smoothing removes
    cfg = T.config(D, q.dtype, interpret=True, fp8=True)
    out = ops.attention(q, k, v, precision="fp8", backend="triton")
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    steps = _fp8_online(q, k, v, cfg["BLOCK_M"], cfg["BLOCK_N"])
    assert_close(out, steps, 8e-3, f"fp8 kernel vs its algorithm D={D}")  # up to the output's bf16 rounding
    exact = ref.attention(*_f64(q, k, v))
    err = rel_err(out, exact)
    assert 1e-2 < err < 0.1, err  # it really quantises, and e4m3's 3 mantissa bits stay a few percent off
    assert rel_err(ops.attention(q, k, v, precision="fp8", backend="ref"), exact) < 0.1  # the CPU emulation


@needs_triton
def test_fp8_block_sparse_attention(interpreter):
    from flgengine.ops.block_mask import random_block_mask
    from flgengine.ops.triton import attention as T

    q, k, v = _qkv(1, 70, 70, 2, 64, torch.float32, "cpu", "contiguous")
    bm = random_block_mask(2, 70, 70, 0.5, 32, 32, seed=5)
    cfg = T.config(64, q.dtype, interpret=True, fp8=True)
    out = ops.attention(q, k, v, block_mask=bm, precision="fp8", backend="triton")
    assert_close(out, _fp8_online(q, k, v, cfg["BLOCK_M"], cfg["BLOCK_N"], bm.token_mask()), 1e-5, "fp8 sparse")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp8_quantize_kernel_equals_its_reference(interpreter, dtype):
    # the Triton pass (one launch per tensor) against fp8.quantize_attention, element for element
    from flgengine.ops import fp8
    from flgengine.ops.triton import quantize as Q

    q, k, v = _qkv(2, 70, 45, 3, 72, dtype, "cpu", "strided")
    k = k + 0.3
    for a, b, name in zip(fp8.quantize_attention(q, k, v, 32, 16, pad_kv=16),
                          Q.quantize_attention(q, k, v, 32, 16, pad_kv=16), ("q8", "q_scale", "k8", "k_scale", "v8", "v_scale")):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.float(), b.float()), name
    assert Q.quantize_attention(q, k, v, 32, 16, pad_kv=16)[4].stride() == (3 * 72 * 48, 72 * 48, 48, 1)  # padded rows


def test_split_head_dim_for_fp8_keeps_32_deep_tiles():
    from flgengine.ops.triton.attention import split_head_dim

    assert [split_head_dim(d, 32) for d in (40, 72, 96, 112, 128)] == [(64, 0), (64, 32), (64, 32), (128, 0), (128, 0)]


@needs_triton
def test_env_backend_picks_triton_under_the_interpreter(interpreter, monkeypatch):
    x, s, h = _nonzero(1, 3, 16), _nonzero(1, 16), _nonzero(1, 16)
    q = _nonzero(1, 5, 2, 8)
    monkeypatch.setenv("FLG_BACKEND", "triton")
    assert registry.pick("adaln_modulate", (x, s, h))[0] == "triton"
    assert registry.pick("attention", (q, q, q))[0] == "triton"
    assert_close(ops.attention(q, q, q), ref.attention(*_f64(q, q, q)), 1e-5, "FLG_BACKEND=triton attention")
    assert "triton" in ops.backends_for("qk_norm_rope")


def test_explicit_triton_backend_that_cannot_serve_raises(monkeypatch):
    monkeypatch.delenv("FLG_BACKEND", raising=False)
    x, s, h = _nonzero(1, 3, 16), _nonzero(1, 16), _nonzero(1, 16)
    q = _nonzero(1, 5, 2, 8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(registry.BackendUnavailable, match="TRITON_INTERPRET=1"):
        ops.adaln_modulate(x, s, h, backend="triton")  # CPU tensors, no interpreter
    monkeypatch.setattr(_common, "import_error", lambda: "triton is not importable (ImportError: test)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(registry.BackendUnavailable, match="triton is not importable"):
        ops.attention(q, q, q, backend="triton")


@needs_triton
def test_explicit_triton_backend_refuses_unsupported_inputs(interpreter):
    x, s, h = _nonzero(1, 3, 16), _nonzero(1, 16), _nonzero(1, 16)
    q = _nonzero(1, 5, 2, 8)
    refuse = lambda match: pytest.raises(registry.BackendUnavailable, match=match)  # noqa: E731
    with refuse("no backward"):
        ops.adaln_modulate(x.clone().requires_grad_(), s, h, backend="triton")
    with torch.no_grad():  # without autograd the same input is served
        ops.adaln_modulate(x.clone().requires_grad_(), s, h, backend="triton")
    with refuse("x dtype torch.float64"):
        ops.adaln_modulate(x.double(), s, h, backend="triton")
    with refuse(r"scale must be \(B, D\)"):
        ops.adaln_modulate(x, s[:, :8], h, backend="triton")
    with refuse("gate dtype torch.float16 must be float32 or x's dtype"):
        ops.gated_residual_adaln(x, x, s.half(), s, h, backend="triton")
    with refuse("head dim D=264"):
        big = _nonzero(1, 2, 1, 264)
        ops.attention(big, big, big, backend="triton")
    with refuse("v dtype torch.float16 must be q's dtype"):
        ops.attention(q, q, q.half(), backend="triton")
    with refuse(r"cos must be \(S, Dh/2\) with S=3"):
        ops.qk_norm_rope(x, x, s[0], s[0], torch.ones(4, 4), torch.ones(4, 4), 2, backend="triton")
    with refuse("not a multiple of the head dim"):
        ops.qk_norm_rope(x, x, s[0], s[0], torch.ones(3, 3), torch.ones(3, 3), 2, backend="triton")


@needs_triton
def test_launchers_raise_value_errors_naming_the_bad_value(interpreter):
    from flgengine.ops.triton import attention as tri_attention
    from flgengine.ops.triton import qk_norm_rope as tri_qk

    q = _nonzero(1, 5, 2, 8)
    with pytest.raises(ValueError, match=r"k/v shape \(1, 5, 2, 16\)"):
        tri_attention.attention(q, _nonzero(1, 5, 2, 16), _nonzero(1, 5, 2, 16))
    x, w = _nonzero(1, 3, 16), _nonzero(16)
    cos = torch.ones(3, 4)  # head dim 8 -> 2 heads
    with pytest.raises(ValueError, match="num_heads=4 does not match"):
        tri_qk.qk_norm_rope(x, x, w, w, cos, cos, 4)
    q_out, _ = tri_qk.qk_norm_rope(x, x, w, w, cos, cos, 2)
    assert q_out.shape == (1, 3, 2, 8)


@needs_triton
def test_kernels_pick_compiled_or_interpreted_per_call(monkeypatch):
    # TRITON_INTERPRET is read by @triton.jit at decoration time; the backend re-wraps per call,
    # so CPU tensors always get the interpreter and CUDA tensors the compiled kernel
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from flgengine.ops.triton import modulate

    kernel = modulate.modulate_kernel
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert isinstance(_common.kernel_for(kernel, torch.device("cuda")), JITFunction)
    assert isinstance(_common.kernel_for(kernel, torch.device("cpu")), InterpretedFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as Triton does: CUDA tensors interpreted too
    assert isinstance(_common.kernel_for(kernel, torch.device("cuda")), InterpretedFunction)


def test_importing_flgengine_does_not_import_triton():
    # nor does asking the triton backend about CPU tensors without the interpreter (torch itself
    # imports triton once a custom op runs, so the check stops before any op runs)
    code = ("import sys, torch, flgengine.ops as ops\n"
            "assert 'triton' not in sys.modules, 'importing flgengine imported triton'\n"
            "x = torch.ones(1, 2, 8)\n"
            "try:\n    ops.adaln_modulate(x, x[:, 0], x[:, 0], backend='triton')\n"
            "except ops.BackendUnavailable as e:\n    assert 'TRITON_INTERPRET' in str(e), e\n"
            "else:\n    raise AssertionError('CPU tensors ran on triton without the interpreter')\n"
            "assert 'triton' not in sys.modules, 'the CPU refusal imported triton'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1],
                   env={"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"})


@needs_triton
def test_custom_ops_pass_opcheck(interpreter):
    x, s, h = _nonzero(1, 3, 16), _nonzero(1, 16), _nonzero(1, 3, 16)
    q, k = _nonzero(1, 3, 16), _nonzero(1, 3, 16)
    cos, sin = _rope_tables(3, 4, "cpu")
    qa, ka = _nonzero(1, 5, 2, 8), _nonzero(1, 4, 2, 8)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(tri.adaln_modulate_triton, (x, s, h, 1e-6), test_utils=utils)
    torch.library.opcheck(tri.gated_residual_adaln_triton, (x, x, s, s, h, 1e-6), test_utils=utils)
    torch.library.opcheck(tri.qk_norm_rope_triton, (q, k, s[0], s[0], cos, sin, 2, 1e-6), test_utils=utils)
    torch.library.opcheck(tri.attention_triton, (qa, ka, ka, ), test_utils=utils)


@needs_triton
def test_torch_export_traces_around_the_kernels(interpreter):
    class Attn(torch.nn.Module):
        def forward(self, q, k, w, cos, sin):
            qh, kh = ops.qk_norm_rope(q, k, w, w, cos, sin, 2, backend="triton")
            return ops.attention(qh, kh, kh, backend="triton")

    q, k, w = _nonzero(1, 6, 16), _nonzero(1, 6, 16), _nonzero(16)
    cos, sin = _rope_tables(6, 4, "cpu")
    ep = torch.export.export(Attn(), (q, k, w, cos, sin))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"flgengine.qk_norm_rope_triton.default", "flgengine.attention_triton.default"} <= targets, targets
    assert torch.equal(ep.module()(q, k, w, cos, sin), Attn()(q, k, w, cos, sin))


def _block(H):
    """A DiT-block-like chain of the four ops through the facade, as the model calls them."""
    def block(x, y, mod, w, cos, sin):
        h = ops.adaln_modulate(x, mod[:, 1], mod[:, 0], backend="triton")
        q, k = ops.qk_norm_rope(h, h * 0.5, w, w, cos, sin, H, backend="triton")
        o = ops.attention(q, k, k, backend="triton").flatten(2)
        return ops.gated_residual_adaln(x, o + y, mod[:, 2], mod[:, 4], mod[:, 3], backend="triton")
    return block


def _block_inputs(B, S, H, Dh, device):
    D = H * Dh
    x, y = _x(B, S, D, torch.bfloat16, device), _x(B, S, D, torch.bfloat16, device)
    mod, w = _nonzero(B, 6, D, device=device), 1 + 0.1 * _nonzero(D, device=device)
    return (x, y, mod, w, *_rope_tables(S, Dh // 2, device))


@needs_triton
def test_torch_compile_fullgraph_through_the_facade(interpreter):
    # dynamo traces registry.pick and the triton why_not, then stops at the custom ops
    # (aot_eager: no C++ toolchain needed; the GPU test below uses inductor)
    args = _block_inputs(2, 8, 2, 8, "cpu")
    eager = _block(2)(*args)
    out = torch.compile(_block(2), fullgraph=True, backend="aot_eager")(*args)
    for a, b in zip(out, eager):
        assert torch.equal(a, b)


def _ptxas_available() -> bool:
    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@needs_triton
@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_available(), reason="this triton install bundles no ptxas")
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter runs the kernels as numpy code, so it misses what only the compiler
    checks (power-of-two aranges, dot minimum sizes, loop-carried types, shared memory).
    Triton compiles for sm_90 here with its bundled ptxas: the Wan bf16 configurations must
    build and fit an H100's 227 KB of shared memory per block, and the bf16 attention kernels
    (split and one-tile head dims) must use wgmma and spill no registers (ptxas -v). In a fresh process without
    TRITON_INTERPRET: this one imported triton under the interpreter, whose library functions
    (tl.sum, ...) the compiler cannot call (a compile cache from another run would hide that)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import test_ops_triton as t; t.compile_for_hopper()"
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.strip().endswith("compiled 18 kernels"), r.stdout[-2000:]


def ptxas_usage(ptx: str) -> dict[str, int]:
    """Registers and spill stores of a kernel for sm_90a, from Triton's bundled ptxas (-v), and its wgmma count."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(90)  # triton 3.7
    except TypeError:
        ptxas = get_ptxas()  # triton 3.6
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([ptxas.path, "-v", "--gpu-name", "sm_90a", str(src), "-o", str(Path(d) / "k.cubin")],
                           capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spills = re.search(r"(\d+) bytes spill stores", r.stderr)
    assert r.returncode == 0 and regs and spills, r.stderr[-2000:]
    return {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)), "wgmma": ptx.count("wgmma.mma_async")}


def compile_for_hopper() -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile
    from triton.runtime.jit import JITFunction

    from flgengine.ops.triton import attention as T
    from flgengine.ops.triton import modulate as M
    from flgengine.ops.triton import qk_norm_rope as Q

    def build(jitted, pointers, consts, div16=(), num_warps=4, num_stages=3):
        fn = JITFunction(jitted.fn)
        sig = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in fn.arg_names}
        sig.update({n: "fp32" for n in ("eps", "qk_scale") if n in sig})
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names if n in pointers or n in div16}
        kernel = triton_compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=num_warps, num_stages=num_stages))
        assert kernel.asm["cubin"] and kernel.metadata.shared <= 227 * 1024, (fn.fn.__name__, consts, kernel.metadata.shared)
        built.append(fn.fn.__name__)
        usage = ptxas_usage(kernel.asm["ptx"])
        print(fn.fn.__name__, {k: v for k, v in consts.items() if k.isupper()}, usage, f"shared {kernel.metadata.shared}",
              flush=True)
        if fn.fn.__name__ == "_attention_kernel":  # bf16 attention: tensor-core (wgmma) products and no spills
            assert usage["wgmma"] > 0 and usage["spill_stores"] == 0, (consts, usage)

    built = []

    bf16, f32 = "*bf16", "*fp32"
    r, w = _common.row_tiling(2048, 32760, interpret=False)  # the launchers' tiling at Wan's D = 1536
    qk_rows, qk_warps = _common.row_tiling(1024, 32760, interpret=False)  # qk_norm_rope: 768 pairs
    rows = dict(ROWS=r, ITERS=1, BLOCK_D=2048, RTNE_BF16=False)
    pointers = dict(xo_ptr=bf16, h_ptr=bf16, x_ptr=bf16, y_ptr=bf16, gate_ptr=f32, scale_ptr=f32, shift_ptr=f32)
    unit = dict(sxd=1, syd=1, sgd=1, scd=1, shd=1)
    for iters in (1, 8):  # the launchers' one row tile per program, and a sweep's loop of 8 tiles
        build(M.modulate_kernel, pointers, dict(**unit, RESIDUAL=False, GATE_PER_SAMPLE=True, SCALE_PER_SAMPLE=True,
                                                SHIFT_PER_SAMPLE=True, **{**rows, "ITERS": iters}), num_warps=w)
    for per_sample in (True, False):  # (B, D) modulation (Wan2.1) / (B, S, D) (Wan2.2 TI2V)
        for residual in (False, True):  # adaln_modulate / gated_residual_adaln
            build(M.modulate_kernel, pointers, dict(**unit, RESIDUAL=residual, GATE_PER_SAMPLE=per_sample,
                                                    SCALE_PER_SAMPLE=per_sample, SHIFT_PER_SAMPLE=per_sample, **rows),
                  num_warps=w)
    build(Q._rms_norm_rope_kernel, dict(out_ptr=bf16, x_ptr=bf16, w_ptr=f32, cos_ptr=f32, sin_ptr=f32),
          dict(sxd=1, sw=1, sci=1, ssi=1, HALF=64, ROWS=qk_rows, BLOCK_P=1024, RTNE_BF16=False), num_warps=qk_warps)
    dense = dict(SPARSE=False, MASK_BQ=16, MASK_BK=16, MASK_HEADS=False)
    sparse = dict(SPARSE=True, MASK_BQ=128, MASK_BK=128, MASK_HEADS=True)
    # (D, split, block-sparse, FP8): 72 has strides only divisible by 8 (STRIDE_ALIGN); split on
    # 64 + 16 channels (64 + 32 in FP8), or one 128 tile
    for D, split, mask, fp8 in ((128, True, dense, False), (72, True, dense, False), (72, False, dense, False),
                                (128, True, sparse, False), (72, True, sparse, False), (128, True, dense, True),
                                (72, True, dense, True), (128, True, sparse, True)):
        cfg = T.config(D, torch.bfloat16, interpret=False, split=split, fp8=fp8)
        if mask["SPARSE"]:
            cfg["BLOCK_M"], cfg["BLOCK_N"] = min(cfg["BLOCK_M"], 128), min(cfg["BLOCK_N"], 128)
        align = 16 if D % 16 == 0 else 8
        strides = [f"s{t}{d}" for t in "qkv" for d in "bsh"]
        qkv = "*fp8e4nv" if fp8 else bf16
        build(T._attention_kernel, dict(out_ptr=bf16, q_ptr=qkv, k_ptr=qkv, v_ptr=qkv, kv_index_ptr="*i32",
                                        kv_count_ptr="*i32", kv_full_ptr="*i32", q_scale_ptr=f32, k_scale_ptr=f32,
                                        v_scale_ptr=f32),
              dict(sqd=1, skd=1, **({"svs": 1} if fp8 else {"svd": 1}), HEAD_DIM=D, STRIDE_ALIGN=align,
                   BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DA=cfg["BLOCK_DA"], BLOCK_DB=cfg["BLOCK_DB"],
                   UPCAST=False, DOT_PRECISION="tf32", RTNE_BF16=False, FP8=fp8, BLOCK_DBX=max(cfg["BLOCK_DB"], 16),
                   **mask),
              div16=strides if align == 16 else (), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    from flgengine.ops.triton import quantize as QZ

    for per_channel, smooth in ((False, False), (False, True), (True, False)):  # Q, K, V
        build(QZ._quant_kernel, dict(out_ptr="*fp8e4nv", scale_ptr=f32, x_ptr=bf16, mean_ptr=f32, vscale_ptr=f32),
              dict(sxd=1, D=128, BLOCK_S=128 if not per_channel else 64, BLOCK_D=128, SMOOTH=smooth,
                   PER_CHANNEL=per_channel, RTNE=False), num_warps=8 if not per_channel else 4)
    print(f"compiled {len(built)} kernels")


# ---- GPU: compiled kernels ---------------------------------------------------------------

WAN = (1, 32760, 1536)  # Wan-1.3B 480p x 81 frames: 21 x 30 x 52 latent tokens, 12 heads x 128
WAN_GRID = (21, 30, 52)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_odd_shapes_and_layouts(compiled, dtype):
    for case in ADALN_CASES:
        check_adaln_modulate(*case[:3], dtype, *case[3:], device="cuda")
    for case in GATED_CASES:
        check_gated_residual_adaln(*case[:3], dtype, *case[3:], device="cuda")
    for case in QK_CASES:
        check_qk_norm_rope(*case[:4], dtype, *case[4:], device="cuda")
    for case in ATTN_CASES + [(1, 17, 9, 1, 8, "contiguous"), (2, 130, 77, 3, 256, "strided")]:
        check_attention(*case[:5], dtype, case[5], device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_wan_1_3b_480p_elementwise_ops(compiled, dtype):
    from flgengine.model.embed import rope_3d

    B, S, D = WAN
    check_adaln_modulate(B, S, D, dtype, "contiguous", "sample_view", "fp32", device="cuda")
    check_gated_residual_adaln(B, S, D, dtype, "contiguous", ("sample_view", "vector", "vector"), device="cuda")
    check_gated_residual_adaln(B, S, D, dtype, "contiguous", ("ones", "sample_view", "sample_view"), device="cuda")
    check_qk_norm_rope(B, S, 12, 128, dtype, "contiguous", "fp32", device="cuda",
                       cos_sin=rope_3d(128, WAN_GRID, 10000.0, 1024, "cuda"))
    x, mod = _x(B, S, D, dtype, "cuda"), _nonzero(B, 6, D, device="cuda")
    assert registry.pick("adaln_modulate", (x, mod[:, 1], mod[:, 0]), "triton")[0] == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Skv", [4096, 512], ids=["self", "cross"])
def test_gpu_attention_wan_heads(compiled, dtype, Skv):
    # Wan-1.3B's 12 heads x 128 at S=4096 (32760 is the bench's job); cross-attention to 512 text tokens
    check_attention(1, 4096, Skv, 12, 128, dtype, "contiguous", device="cuda")
    check_attention(2, 1000, Skv, 12, 128, dtype, "strided", device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("D", [40, 72, 96, 112])
def test_gpu_attention_pruned_head_dims_vs_sdpa(compiled, D):
    B, S, H = 1, 1000, 12
    q, k, v = _qkv(B, S, S, H, D, torch.float32, "cuda", "contiguous")
    out = ops.attention(q, k, v, backend="triton")
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    expect = ref.attention(*_f64(q, k, v))
    assert_close(out, expect, 1e-5, f"attention fp32 D={D} vs float64")
    assert_close(out, sdpa, max(2e-5, 2 * rel_err(sdpa, expect)), f"attention fp32 D={D} vs torch SDPA fp32")
    for dtype in (torch.bfloat16, torch.float16):
        check_attention(B, S, S, H, D, dtype, "contiguous", device="cuda")
        check_attention(B, S, 77, H, D, dtype, "strided", device="cuda")
    # (the dense loop runs one power-of-two tile on a GPU: see attention.attention; the split
    # tiles are covered by the block-sparse and FP8 tests below)


@pytest.mark.gpu
def test_gpu_triton_ops_under_torch_compile(compiled):
    args = _block_inputs(2, 64, 4, 40, "cuda")
    eager = _block(4)(*args)
    out = torch.compile(_block(4), fullgraph=True)(*args)
    for a, b in zip(out, eager):
        assert_close(a, b, 1e-2, "torch.compile (inductor) vs eager")


@pytest.mark.gpu
@pytest.mark.parametrize("D", [128, 72, 40])
def test_gpu_block_sparse_attention(compiled, D):
    from flgengine.ops.block_mask import random_block_mask

    for (Sq, Skv, H, Hm, density, block), dtype in zip(
            [(4096, 4096, 12, 12, 0.25, 128), (1000, 777, 3, 1, 0.5, 64), (300, 300, 2, 2, 1.0, 128)],
            [torch.bfloat16, torch.float16, torch.bfloat16]):
        q, k, v = _qkv(1, Sq, Skv, H, D, dtype, "cuda", "strided")
        bm = random_block_mask(Hm, Sq, Skv, density, block, block, seed=2, device="cuda")
        out = ops.attention(q, k, v, block_mask=bm, backend="triton")
        expect = ops.attention(*_f64(q, k, v), block_mask=bm, backend="ref")
        what = f"sparse attention D={D} Sq={Sq} Skv={Skv} density={density} {dtype}"
        assert_close(out, expect, _tol(dtype, ops.attention(q, k, v, block_mask=bm, backend="ref"), expect), what)
        if ops.registry.why_not("attention_ext", "flex", q, k, v, bm) is None:  # FlexAttention: 128-multiple blocks
            assert_close(ops.attention(q, k, v, block_mask=bm, backend="flex"), expect, 2e-2, what + " FlexAttention")


@pytest.mark.gpu
@pytest.mark.parametrize("D", [128, 72])
def test_gpu_fp8_attention(compiled, D):
    from flgengine.ops.block_mask import random_block_mask
    from flgengine.ops.triton import attention as T

    q, k, v = _qkv(1, 300, 270, 2, D, torch.bfloat16, "cuda", "strided")
    cfg = T.config(D, q.dtype, interpret=False, fp8=True)
    out = ops.attention(q, k, v, precision="fp8", backend="triton")
    assert_close(out, _fp8_online(q, k, v, cfg["BLOCK_M"], cfg["BLOCK_N"]), 1e-2, f"fp8 kernel vs its algorithm D={D}")
    err = rel_err(out, ref.attention(*_f64(q, k, v)))
    assert 1e-2 < err < 0.1, err
    bm = random_block_mask(2, 300, 270, 0.5, 128, 128, seed=4, device="cuda")
    sparse = ops.attention(q, k, v, block_mask=bm, precision="fp8", backend="triton")
    assert_close(sparse, _fp8_online(q, k, v, cfg["BLOCK_M"], cfg["BLOCK_N"], bm.token_mask()), 1e-2, "fp8 sparse")
