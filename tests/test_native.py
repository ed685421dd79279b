"""flgengine._C, the native boundary: what the build holds, how the entry points take their
arguments (tensor views by name, checked once) and report bad ones, and the CUDA kernels run
in host emulation (no GPU needed). The ops' numbers against the reference, for every
backend, are in tests/ops/test_<op>.py."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from flgengine.ops import native

needs_C = pytest.mark.skipif(native._C is None, reason="flgengine._C not built")
NATIVE_OPS = ("adaln_modulate", "gated_residual_adaln", "qk_norm_rope", "attention")


@needs_C
def test_build_info_reports_cuda_arches_and_backends():
    info = native.build_info()
    assert "cpu" in info["backends"] and set(NATIVE_OPS) <= set(info["ops"])
    assert all(hasattr(native._C, f"{op}_cpu") for op in NATIVE_OPS)
    assert isinstance(info["cuda"], bool)
    if shutil.which("nvcc") or os.environ.get("CUDACXX"):  # a CUDA compiler here: the CUDA ops must be built in
        assert info["cuda"], "nvcc is present but flgengine._C was built without CUDA"
    if info["cuda"]:  # Ampere and the Hopper arch-specific target
        assert {"80", "90a"} <= set(info["cuda_archs"].split(";"))
        assert "cuda" in info["backends"]
        assert all(hasattr(native._C, f"{op}_cuda") for op in NATIVE_OPS)


class _Views:
    """native.view that keeps each tensor alive for the test (a view does not own its memory)."""

    def __init__(self):
        self.tensors = []

    def __call__(self, t):
        self.tensors.append(t)
        return native.view(t)


@needs_C
def test_C_reports_bad_arguments_as_value_errors():
    view = _Views()
    x = torch.ones(1, 2, 8)
    v = view(x)
    mod = view(x[:, :1].expand(1, 2, 8))  # a per-sample modulation: stride 0 over S
    good = dict(out=v, x=v, scale=mod, shift=mod, eps=1e-6)
    native._C.adaln_modulate_cpu(**good)
    with pytest.raises(ValueError, match=r"adaln_modulate: argument x: unsupported dtype code 7"):
        native._C.adaln_modulate_cpu(**{**good, "x": (v[0], 7, *v[2:])})
    with pytest.raises(ValueError, match="argument out: null data pointer"):
        native._C.adaln_modulate_cpu(**{**good, "out": (0, *v[1:])})
    with pytest.raises(ValueError, match="argument scale: negative size or stride"):
        native._C.adaln_modulate_cpu(**{**good, "scale": (*mod[:4], (0, -8, 1))})
    with pytest.raises(ValueError, match="argument shift: expected a tensor view"):
        native._C.adaln_modulate_cpu(**{**good, "shift": x.data_ptr()})
    with pytest.raises(ValueError, match="argument x: tensor is on cuda, this entry point takes cpu tensors"):
        native._C.adaln_modulate_cpu(**{**good, "x": (v[0], v[1], 1, *v[3:])})
    with pytest.raises(ValueError, match=r"adaln_modulate \(cpu\): scale must have shape \(1, 2, 8\), got \(1, 8\)"):
        native._C.adaln_modulate_cpu(**{**good, "scale": view(x[:, 0])})
    with pytest.raises(ValueError, match="scale dtype bfloat16 must be float32 or x's dtype float16"):
        h = view(x.half())
        native._C.adaln_modulate_cpu(out=h, x=h, scale=view(x.bfloat16()), shift=h, eps=1e-6)
    with pytest.raises(ValueError, match="x must be contiguous"):
        native._C.adaln_modulate_cpu(**{**good, "x": view(torch.ones(1, 8, 2).transpose(1, 2))})
    # arguments go by name: none missing, none unknown (a swap cannot go unnoticed)
    with pytest.raises(TypeError, match="adaln_modulate: missing argument eps"):
        native._C.adaln_modulate_cpu(out=v, x=v, scale=mod, shift=mod)
    with pytest.raises(TypeError, match="adaln_modulate: unexpected argument gate"):
        native._C.adaln_modulate_cpu(**good, gate=mod)
    with pytest.raises(ValueError, match="argument eps: expected a number"):
        native._C.adaln_modulate_cpu(**{**good, "eps": "small"})


@needs_C
def test_C_fused_ops_report_bad_arguments_as_value_errors():
    view = _Views()
    x = torch.ones(1, 2, 8)
    v, m = view(x), view(x[:, :1].expand(1, 2, 8))
    gated = dict(x_out=v, h_out=v, x=v, y=v, gate=m, scale=m, shift=m, eps=1e-6)
    native._C.gated_residual_adaln_cpu(**gated)
    with pytest.raises(ValueError, match="gated_residual_adaln: argument x: unsupported dtype code 5"):
        native._C.gated_residual_adaln_cpu(**{**gated, "x": (v[0], 5, *v[2:])})
    with pytest.raises(ValueError, match="gate dtype bfloat16 must be float32 or x's dtype float16"):
        h = view(x.half())
        native._C.gated_residual_adaln_cpu(**{**gated, "x_out": h, "h_out": h, "x": h, "y": h,
                                              "gate": view(x.bfloat16())})
    with pytest.raises(ValueError, match="gate, scale and shift must share one dtype"):
        h = view(x.half())
        native._C.gated_residual_adaln_cpu(**{**gated, "x_out": h, "h_out": h, "x": h, "y": h, "gate": h})
    with pytest.raises(ValueError, match=r"gated_residual_adaln \(cpu\): x has D = 0"):
        e = view(torch.ones(1, 2, 0))
        native._C.gated_residual_adaln_cpu(**{k: e for k in gated if k != "eps"}, eps=1e-6)
    with pytest.raises(ValueError, match=r"h_out must have shape \(1, 2, 8\)"):
        native._C.gated_residual_adaln_cpu(**{**gated, "h_out": view(torch.ones(1, 8, 2))})
    q, w, cs = view(torch.ones(1, 2, 6)), view(torch.ones(6)), view(torch.ones(2, 1))
    qk = dict(q_out=view(torch.ones(1, 2, 3, 2)), k_out=view(torch.ones(1, 2, 3, 2)), q=q, k=q,
              q_weight=w, k_weight=w, cos=cs, sin=cs, eps=1e-6)
    native._C.qk_norm_rope_cpu(**qk)
    odd = view(torch.ones(1, 2, 2, 3))  # head dim 3
    with pytest.raises(ValueError, match=r"qk_norm_rope \(cpu\): q_out \(1, 2, 2, 3\) must split q's last dim 6 into "
                                         "heads of an even"):
        native._C.qk_norm_rope_cpu(**{**qk, "q_out": odd, "k_out": odd})
    with pytest.raises(ValueError, match="q_weight must be float32, got float16"):
        native._C.qk_norm_rope_cpu(**{**qk, "q_weight": view(torch.ones(6).half())})
    with pytest.raises(ValueError, match="unsupported dtype code 9"):
        native._C.qk_norm_rope_cpu(**{**qk, "q": (q[0], 9, *q[2:])})
    a = view(torch.ones(1, 2, 2, 8))
    attn = dict(out=a, q=a, k=a, v=a, scale=0.5)
    native._C.attention_cpu(**attn)
    with pytest.raises(ValueError, match=r"attention \(cpu\): k and v have no keys"):
        empty = view(torch.ones(1, 0, 2, 8))
        native._C.attention_cpu(**{**attn, "k": empty, "v": empty})
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        native._C.attention_cpu(**{**attn, "scale": float("nan")})
    with pytest.raises(ValueError, match="unsupported dtype code 3"):
        native._C.attention_cpu(**{**attn, "q": (a[0], 3, *a[2:])})
    with pytest.raises(ValueError, match="v must be float32, got float16"):
        native._C.attention_cpu(**{**attn, "v": view(torch.ones(1, 2, 2, 8).half())})


# ---- CUDA kernels in host emulation (no GPU needed) -------------------------------------------

@pytest.mark.slow
def test_cuda_kernels_match_reference_in_host_emulation(tmp_path):
    """csrc/emulate/kernels_emulate.cpp runs the device code of the three fused CUDA ops (with
    mma.sync emulated from the PTX fragment tables) on std::threads and checks each against
    a float64 reference: odd shapes, padded head dims, strided and unaligned inputs."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler on this machine")
    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / "kernels_emulate"
    subprocess.run([cxx, "-std=c++20", "-O1", "-fno-strict-aliasing", "-pthread", "-DFLG_HOST_EMULATION",
                    f"-I{root / 'csrc/emulate/shim'}", f"-I{root / 'csrc/include'}",
                    str(root / "csrc/emulate/kernels_emulate.cpp"), "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    lines = run.stdout.splitlines()
    assert run.returncode == 0, run.stdout + run.stderr
    assert len(lines) >= 26 and all(line.startswith("ok") for line in lines), run.stdout
    for op in ("attention", "gated_residual_adaln", "qk_norm_rope"):
        assert any(op in line for line in lines)
