"""The Triton backend's machinery (flgengine/ops/triton): head-dim tiling, compiled vs
interpreted kernels per call, triton imported only when used, and an offline compile of the
kernels for Hopper (`compile_for_hopper`: sm_90 with Triton's bundled ptxas, no GPU needed).
The ops' numbers against the reference are in tests/ops/test_<op>.py."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from flgengine.ops.triton import _common
from opcases import needs_triton


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
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2],
                   env={"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"})


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
    here = Path(__file__).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join([str(here), str(here.parent), *filter(None, [env.get("PYTHONPATH")])])
    code = "import test_triton_kernels as t; t.compile_for_hopper()"
    r = subprocess.run([sys.executable, "-c", code], cwd=here, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.strip().endswith("compiled 22 kernels"), r.stdout[-2000:]


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
    rows = dict(ROWS=r, ITERS=1, BLOCK_D=2048, RTNE_BF16=False, FP8_OUT=False, RTNE_E4M3=False)
    pointers = dict(xo_ptr=bf16, h_ptr=bf16, hs_ptr=bf16, x_ptr=bf16, y_ptr=bf16, gate_ptr=f32, scale_ptr=f32,
                    shift_ptr=f32)
    unit = dict(sxd=1, syd=1, sgd=1, scd=1, shd=1)
    for iters in (1, 8):  # the launchers' one row tile per program, and a sweep's loop of 8 tiles
        build(M.modulate_kernel, pointers, dict(**unit, RESIDUAL=False, GATE_PER_SAMPLE=True, SCALE_PER_SAMPLE=True,
                                                SHIFT_PER_SAMPLE=True, **{**rows, "ITERS": iters}), num_warps=w)
    for per_sample in (True, False):  # (B, D) modulation (Wan2.1) / (B, S, D) (Wan2.2 TI2V)
        for residual in (False, True):  # adaln_modulate / gated_residual_adaln
            build(M.modulate_kernel, pointers, dict(**unit, RESIDUAL=residual, GATE_PER_SAMPLE=per_sample,
                                                    SCALE_PER_SAMPLE=per_sample, SHIFT_PER_SAMPLE=per_sample, **rows),
                  num_warps=w)
    for residual in (False, True):  # the FP8-out variants (adaln_modulate_fp8 / gated_residual_adaln_fp8)
        build(M.modulate_kernel, {**pointers, "h_ptr": "*fp8e4nv", "hs_ptr": f32},
              dict(**unit, RESIDUAL=residual, GATE_PER_SAMPLE=True, SCALE_PER_SAMPLE=True, SHIFT_PER_SAMPLE=True,
                   **{**rows, "FP8_OUT": True}), num_warps=w)
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
    for K, gelu in ((1536, False), (8960, True)):  # per-token quantisation (o's input) and gelu_fp8 (FFN hidden)
        block = _common.next_pow2(K)
        build(QZ._token_quant_kernel, dict(out_ptr="*fp8e4nv", scale_ptr=f32, x_ptr=bf16),
              dict(ROWS=max(1, min(16, 4096 // block)), BLOCK_K=block, GELU=gelu, RTNE=False),
              num_warps=4 if block <= 4096 else 8)
    print(f"compiled {len(built)} kernels")
