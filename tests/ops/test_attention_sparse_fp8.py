"""Block-sparse and FP8 attention (`ops.attention(..., block_mask=, precision="fp8")`) on
every backend that serves them (ref, triton, FlexAttention for masks) against the
reference: flgengine/ops/ref.py, and for FP8 the kernel's algorithm step by step."""

import math

import pytest
import torch

from flgengine import ops
from flgengine.ops import ref
from helpers import assert_close, rel_err
from opcases import f64, needs_triton, qkv, tol


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
    q, k, v = qkv(B, Sq, Skv, H, D, dtype, "cpu", layout)
    bm = random_block_mask(Hm, Sq, Skv, density, bq, bk, seed=3)
    out = ops.attention(q, k, v, block_mask=bm, backend="triton")
    expect = ops.attention(*f64(q, k, v), block_mask=bm, backend="ref")
    bar = tol("triton", dtype, ops.attention(q, k, v, block_mask=bm, backend="ref"), expect)
    assert_close(out, expect, bar, f"sparse attention {case} {dtype}")
    if density == 1.0:  # every tile: the dense kernel's result
        assert bm.is_dense
        assert_close(out, ops.attention(q, k, v, backend="triton"), 1e-6, "density 1 vs dense")
    else:  # the mask matters: dense attention is far from it
        assert rel_err(ref.attention(*f64(q, k, v)), expect) > 0.05


@needs_triton
def test_block_sparse_attention_masked_rows_and_backends(interpreter):
    from flgengine.ops.block_mask import BlockMask

    q, k, v = qkv(1, 40, 40, 2, 32, torch.float32, "cpu", "contiguous")
    mask = torch.ones(2, 3, 3, dtype=torch.bool)
    mask[0, 1] = False  # head 0's second query block attends to nothing: zeros
    mask[1, :, 2] = False
    bm = BlockMask(mask, 40, 40, 16, 16)
    out = ops.attention(q, k, v, block_mask=bm, backend="triton")
    assert torch.equal(out[0, 16:32, 0], torch.zeros(16, 32))
    expect = ops.attention(*f64(q, k, v), block_mask=bm, backend="ref")
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

    q, k, v = qkv(1, Sq, Skv, H, D, torch.bfloat16, "cpu", "strided")
    k = k + 0.5  # an offset in K that smoothing removes
    cfg = T.config(D, q.dtype, interpret=True, fp8=True)
    out = ops.attention(q, k, v, precision="fp8", backend="triton")
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    steps = _fp8_online(q, k, v, cfg["BLOCK_M"], cfg["BLOCK_N"])
    assert_close(out, steps, 8e-3, f"fp8 kernel vs its algorithm D={D}")  # up to the output's bf16 rounding
    exact = ref.attention(*f64(q, k, v))
    err = rel_err(out, exact)
    assert 1e-2 < err < 0.1, err  # it really quantises, and e4m3's 3 mantissa bits stay a few percent off
    assert rel_err(ops.attention(q, k, v, precision="fp8", backend="ref"), exact) < 0.1  # the CPU emulation


@needs_triton
def test_fp8_block_sparse_attention(interpreter):
    from flgengine.ops.block_mask import random_block_mask
    from flgengine.ops.triton import attention as T

    q, k, v = qkv(1, 70, 70, 2, 64, torch.float32, "cpu", "contiguous")
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

    q, k, v = qkv(2, 70, 45, 3, 72, dtype, "cpu", "strided")
    k = k + 0.3
    for a, b, name in zip(fp8.quantize_attention(q, k, v, 32, 16, pad_kv=16),
                          Q.quantize_attention(q, k, v, 32, 16, pad_kv=16), ("q8", "q_scale", "k8", "k_scale", "v8", "v_scale")):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.float(), b.float()), name
    assert Q.quantize_attention(q, k, v, 32, 16, pad_kv=16)[4].stride() == (3 * 72 * 48, 72 * 48, 48, 1)  # padded rows


def test_split_head_dim_for_fp8_keeps_32_deep_tiles():
    from flgengine.ops.triton.attention import split_head_dim

    assert [split_head_dim(d, 32) for d in (40, 72, 96, 112, 128)] == [(64, 0), (64, 32), (64, 32), (128, 0), (128, 0)]



# ---- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("D", [128, 72, 40])
def test_gpu_block_sparse_attention(compiled, D):
    from flgengine.ops.block_mask import random_block_mask

    for (Sq, Skv, H, Hm, density, block), dtype in zip(
            [(4096, 4096, 12, 12, 0.25, 128), (1000, 777, 3, 1, 0.5, 64), (300, 300, 2, 2, 1.0, 128)],
            [torch.bfloat16, torch.float16, torch.bfloat16]):
        q, k, v = qkv(1, Sq, Skv, H, D, dtype, "cuda", "strided")
        bm = random_block_mask(Hm, Sq, Skv, density, block, block, seed=2, device="cuda")
        out = ops.attention(q, k, v, block_mask=bm, backend="triton")
        expect = ops.attention(*f64(q, k, v), block_mask=bm, backend="ref")
        what = f"sparse attention D={D} Sq={Sq} Skv={Skv} density={density} {dtype}"
        assert_close(out, expect, tol("triton", dtype, ops.attention(q, k, v, block_mask=bm, backend="ref"), expect), what)
        if ops.registry.why_not("attention_ext", "flex", q, k, v, bm) is None:  # FlexAttention: 128-multiple blocks
            assert_close(ops.attention(q, k, v, block_mask=bm, backend="flex"), expect, 2e-2, what + " FlexAttention")


@pytest.mark.gpu
@pytest.mark.parametrize("D", [128, 72])
def test_gpu_fp8_attention(compiled, D):
    from flgengine.ops.block_mask import random_block_mask
    from flgengine.ops.triton import attention as T

    q, k, v = qkv(1, 300, 270, 2, D, torch.bfloat16, "cuda", "strided")
    cfg = T.config(D, q.dtype, interpret=False, fp8=True)
    out = ops.attention(q, k, v, precision="fp8", backend="triton")
    assert_close(out, _fp8_online(q, k, v, cfg["BLOCK_M"], cfg["BLOCK_N"]), 1e-2, f"fp8 kernel vs its algorithm D={D}")
    err = rel_err(out, ref.attention(*f64(q, k, v)))
    assert 1e-2 < err < 0.1, err
    bm = random_block_mask(2, 300, 270, 0.5, 128, 128, seed=4, device="cuda")
    sparse = ops.attention(q, k, v, block_mask=bm, precision="fp8", backend="triton")
    assert_close(sparse, _fp8_online(q, k, v, cfg["BLOCK_M"], cfg["BLOCK_N"], bm.token_mask()), 1e-2, "fp8 sparse")


def test_block_mask_and_fp8_follow_the_shared_backend_choice(monkeypatch):
    # FLG_BACKEND names a backend these options do not have: the automatic pick serves them
    # (as for every op); an explicit backend= that lacks them raises
    from flgengine.ops.block_mask import random_block_mask

    q, k, v = (torch.randn(1, 40, 2, 32) for _ in range(3))
    bm = random_block_mask(2, 40, 40, 0.5, 16, 16)
    monkeypatch.setenv("FLG_BACKEND", "cpu")
    assert torch.equal(ops.attention(q, k, v, block_mask=bm), ops.attention(q, k, v, block_mask=bm, backend="ref"))
    assert torch.equal(ops.attention(q, k, v, precision="fp8"), ops.attention(q, k, v, precision="fp8", backend="ref"))
    with pytest.raises(ops.BackendUnavailable, match="has no 'cpu' backend"):
        ops.attention(q, k, v, block_mask=bm, backend="cpu")
