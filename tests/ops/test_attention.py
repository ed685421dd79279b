"""Dense attention on every backend against flgengine/ops/ref.py (torch SDPA): non-causal
softmax attention, (B, Sq, H, D) x (B, Skv, H, D). Block-sparse and FP8 attention:
test_attention_sparse_fp8.py."""

import pytest
import torch
import torch.nn.functional as F

from flgengine import ops
from flgengine.ops import native, ref, registry
from helpers import assert_close, rel_err
from opcases import (ATTN_FLOOR, CPU_BACKENDS, DTYPES, GPU_BACKENDS, case_id, f64, needs_C, needs_triton, nonzero, qkv,
                     tol)

CASES = [  # B, Sq, Skv, H, D, layout. Interpreter tiles are 32 x 16: Skv 37 = 2 full K/V
    (1, 37, 37, 2, 40, "contiguous"),  # blocks + a tail of 5; 5 = a tail only; 48 = no tail; 33 = a tail of 1
    (2, 19, 5, 2, 72, "strided"),  # cross-attention, non-contiguous q, k, v
    (1, 7, 48, 1, 112, "contiguous"),
    (1, 33, 33, 2, 24, "strided"),
    (1, 7, 13, 1, 40, "contiguous"),
    (2, 33, 65, 2, 72, "contiguous"),
    (1, 65, 17, 3, 96, "contiguous"),
    (1, 16, 16, 2, 112, "contiguous"),
    (2, 9, 31, 3, 24, "contiguous"),
]


def check(backend, q, k, v, what):
    out = ops.attention(q, k, v, backend=backend)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    expect = ref.attention(*f64(q, k, v))
    assert_close(out, expect, tol(backend, q.dtype, ref.attention(q, k, v), expect, ATTN_FLOOR), f"{backend} attention {what}")
    return out


def check_case(backend, B, Sq, Skv, H, D, dtype, layout, device="cpu"):
    q, k, v = qkv(B, Sq, Skv, H, D, dtype, device, layout)
    assert layout == "contiguous" or not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    return check(backend, q, k, v, f"{dtype} B={B} Sq={Sq} Skv={Skv} H={H} D={D} {layout}")


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(backend, case, dtype):
    check_case(backend, *case[:5], dtype, case[5])


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("D,Skv", [(8, 1), (256, 9)])
def test_head_dim_extremes(backend, D, Skv):
    # D=8 pads to a 16-wide tile in Triton (the dot's minimum), attending to a single key; 256
    # is the largest head dim served
    check_case(backend, 1, 17, Skv, 1, D, torch.float32, "contiguous")


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reads_strided_views(backend, dtype):
    B, S, L, H, D = 2, 19, 11, 3, 40
    q, _, _ = nonzero(B, S, 3, H, D, dtype=dtype).unbind(2)  # a fused qkv projection: token stride 3HD
    k = nonzero(B, H, L, D, dtype=dtype).transpose(1, 2)  # head-major storage
    v = nonzero(B, L, D, H, dtype=dtype).transpose(2, 3)  # last dim not contiguous: copied
    assert q.stride(1) == 3 * H * D and k.stride(2) == L * D and v.stride(-1) != 1
    check(backend, q, k, v, f"strided {dtype}")


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_passes_torch_library_opcheck(backend):
    from flgengine.ops import triton as tri

    op = native.attention if backend == "cpu" else tri.attention_triton
    q, k = nonzero(1, 5, 2, 8), nonzero(1, 4, 2, 8)
    torch.library.opcheck(op, (q, k, k), test_utils=("test_schema", "test_faketensor"))


def test_cpu_attention_serves_explicit_requests_only(monkeypatch):
    """The C++ attention is correct but slower than torch SDPA on CPU: the automatic pick
    keeps the reference, an explicit request (argument or FLG_BACKEND) gets it."""
    q = nonzero(1, 5, 2, 8)
    assert registry.pick("attention", (q, q, q))[0] == "ref"
    if native._C is not None:
        assert registry.pick("attention", (q, q, q), "cpu")[0] == "cpu"
        with registry.prefer("cpu"):  # a model-wide preference keeps the faster reference here
            assert registry.pick("attention", (q, q, q))[0] == "ref"
            assert registry.pick("adaln_modulate", (q[:, :, 0], q[:, 0, 0], q[:, 0, 0]))[0] == "cpu"
        monkeypatch.setenv("FLG_BACKEND", "cpu")
        assert registry.pick("attention", (q, q, q))[0] == "cpu"


@needs_C
def test_cpu_refuses_bad_inputs_before_compute():
    q = nonzero(1, 4, 2, 8)
    with pytest.raises(registry.BackendUnavailable, match=r"k and v must be \(B, Skv, H, D\)"):
        ops.attention(q, nonzero(1, 4, 3, 8), nonzero(1, 4, 3, 8), backend="cpu")
    with pytest.raises(registry.BackendUnavailable, match="no keys"):
        ops.attention(q, nonzero(1, 0, 2, 8), nonzero(1, 0, 2, 8), backend="cpu")
    with pytest.raises(registry.BackendUnavailable, match="share one dtype"):
        ops.attention(q, q.half(), q, backend="cpu")
    with pytest.raises(registry.BackendUnavailable, match="must be \\(B, S, H, D\\)"):
        ops.attention(q[0], q[0], q[0], backend="cpu")


@needs_C
def test_cpu_passes_empty_batches_through():
    q = nonzero(2, 0, 3, 8)
    assert ops.attention(q, nonzero(2, 4, 3, 8), nonzero(2, 4, 3, 8), backend="cpu").shape == (2, 0, 3, 8)


@needs_triton
@pytest.mark.parametrize("D", [40, 72, 96])
def test_triton_split_and_whole_head_dim_tiles_agree(interpreter, D):
    # the same math on 32 + 16 / 64 + 16 / 64 + 32 channels as on one 64 / 128 / 128 tile;
    # cross-attention with a K/V tail, bf16 (P rounded before the second product in both)
    from flgengine.ops.triton import attention as T

    q, k, v = qkv(2, 19, 21, 2, D, torch.bfloat16, "cpu", "strided")
    assert T.config(D, q.dtype, interpret=True)["BLOCK_DB"] > 0
    split, whole = T.attention(q, k, v), T.attention(q, k, v, tiling={"SPLIT_D": False})
    expect = ref.attention(*f64(q, k, v))
    assert_close(split, whole, 1e-3, f"split vs whole D={D}")
    assert_close(split, expect, tol("triton", q.dtype, ref.attention(q, k, v), expect), f"split vs reference D={D}")


@needs_triton
def test_triton_launcher_raises_value_errors_naming_the_bad_value(interpreter):
    from flgengine.ops.triton import attention as tri_attention

    q = nonzero(1, 5, 2, 8)
    with pytest.raises(ValueError, match=r"k/v shape \(1, 5, 2, 16\)"):
        tri_attention.attention(q, nonzero(1, 5, 2, 16), nonzero(1, 5, 2, 16))


# ---- GPU ---------------------------------------------------------------------------------------

GPU_CASES = CASES + [
    (1, 17, 9, 1, 8, "contiguous"), (2, 130, 77, 3, 256, "strided"),
    (2, 77, 200, 3, 40, "contiguous"), (1, 130, 77, 2, 72, "contiguous"), (1, 65, 512, 2, 96, "contiguous"),
    (1, 100, 100, 1, 112, "contiguous"), (1, 33, 17, 1, 256, "contiguous"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_odd_shapes_and_layouts(gpu_backend, dtype):
    for case in GPU_CASES:
        check_case(gpu_backend, *case[:5], dtype, case[5], device="cuda")
    q = nonzero(1, 9, 2, 64, dtype=dtype, device="cuda")
    assert registry.pick("attention", (q, q, q))[0] == "ref"  # explicit-only: SDPA measured faster


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Skv", [4096, 512], ids=["self", "cross"])
def test_gpu_wan_heads(gpu_backend, dtype, Skv):
    # Wan-1.3B's 12 heads x 128 at S=4096 (32760 is the bench's job); cross-attention to 512 text tokens
    check_case(gpu_backend, 1, 4096, Skv, 12, 128, dtype, "contiguous", device="cuda")
    check_case(gpu_backend, 2, 1000, Skv, 12, 128, dtype, "strided", device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_reads_strided_views(gpu_backend, dtype):
    B, S, L, H, D = 2, 300, 77, 4, 64
    q, _, _ = nonzero(B, S, 3, H, D, device="cuda").to(dtype).unbind(2)
    k = nonzero(B, H, L, D, device="cuda").to(dtype).transpose(1, 2)
    v = nonzero(B, L + 1, H, D, device="cuda").to(dtype)[:, 1:]  # offset base pointer
    check(gpu_backend, q, k, v, f"strided {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("D", [40, 72, 96, 112])
def test_gpu_pruned_head_dims_vs_sdpa(gpu_backend, D):
    B, S, H = 1, 1000, 12
    q, k, v = qkv(B, S, S, H, D, torch.float32, "cuda", "contiguous")
    out = ops.attention(q, k, v, backend=gpu_backend)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    expect = ref.attention(*f64(q, k, v))
    assert_close(out, expect, 1e-5, f"{gpu_backend} attention fp32 D={D} vs float64")
    assert_close(out, sdpa, max(2e-5, 2 * rel_err(sdpa, expect)), f"{gpu_backend} attention fp32 D={D} vs torch SDPA fp32")
    for dtype in (torch.bfloat16, torch.float16):
        check_case(gpu_backend, B, S, S, H, D, dtype, "contiguous", device="cuda")
        check_case(gpu_backend, B, S, 77, H, D, dtype, "strided", device="cuda")
    # (Triton's dense loop runs one power-of-two tile on a GPU: see triton/attention.py; the split
    # tiles are covered by the block-sparse and FP8 tests)


@pytest.mark.gpu
def test_gpu_cuda_backend_refuses_what_its_kernels_cannot_serve():
    if not native.build_info()["cuda"]:
        pytest.skip("flgengine._C built without CUDA")
    q = nonzero(1, 8, 2, 12).cuda()  # head dim 12: not a multiple of 8
    with pytest.raises(registry.BackendUnavailable, match="multiple of 8"):
        ops.attention(q, q, q, backend="cuda")
    assert registry.pick("attention", (q, q, q))[0] != "cuda"  # the automatic pick falls back
