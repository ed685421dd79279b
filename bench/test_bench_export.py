"""Engines on this CPU: the shapes student's DiT step and whole 4-step generate(), eager
PyTorch vs ONNX Runtime vs AOTInductor, as ratios measured in one run.

The student: the shipped `shapes-4step` bundle, or, before it ships, the shipped teacher
with the blocks of its 30% plan removed (blocks 2, 3, 4 of 8: the same architecture and
cost) and the 4-step sampler: Wan DiT width 192 (4 heads x 48), FFN 768, pixels
patchified (1, 8, 8): 9 x 4 x 4 = 144 tokens, 8 word tokens. Building the engines exports
one ONNX file and compiles one AOTInductor package (two to three minutes on 2 cores).

GPU variants (`gpu` marker, run by `bench/device_check.sh`): the 4-step loop eager vs one
CUDA graph vs an AOTInductor CUDA engine for the same student, and eager vs CUDA graph for
a Wan2.1-1.3B-shaped student (21 of 30 blocks, width 1536) at 480p, bf16.

    pytest bench/test_bench_export.py -s
"""

import shutil

import pytest
import torch

import flgengine
from flgengine.bundle import save_bundle
from flgengine.config import ModelConfig
from flgengine.model import DiT
from flgengine.pipeline import resolve_model, shipped_models
from flgengine.sampling import FewStepSampler, randn
from ceilings import cpu_matmul_GFLOPs
from timing import median_seconds
from wan_onnx_export import WAN_1_3B_STUDENT

STUDENT_DROP = [2, 3, 4]  # the blocks the shapes student's plan removes from the teacher's 8


def _student_bundle(path):
    """The shipped shapes student, else the shipped teacher with its plan's blocks removed."""
    from distill.plan import apply_plan, plan_from_drop
    from distill.student import student_pipeline_config
    from distill.stage3 import Stage3Config

    if "shapes-4step" in shipped_models():
        return resolve_model("shapes-4step")
    teacher = flgengine.load("shapes-teacher", dtype="fp32")
    n = len(teacher.dit.blocks)
    student = apply_plan(teacher.dit, plan_from_drop(teacher.dit, STUDENT_DROP, {b: 0.0 for b in range(n)}))
    save_bundle(path, student, student_pipeline_config(teacher.config, Stage3Config()),
                {"kind": "bench: the shapes teacher with its plan's blocks removed"})
    shutil.copytree(resolve_model("shapes-teacher") / "text_encoder", path / "text_encoder")
    return path


def _student_inputs(pipe, g):
    """x (1, C, F, H, W), t (1,), context (1, L, text_dim) for the student's pipeline."""
    c = pipe.config
    latent = pipe.codec.latent_shape(c.num_frames, c.height, c.width)
    L = c.text_encoder.max_length
    return torch.randn(1, *latent, generator=g), torch.tensor([900.0]), torch.randn(1, L, pipe.dit.config.text_dim,
                                                                                    generator=g)


def _products(dit, tokens: int, text_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The DiT step's matrix products as (a, b) pairs of their shapes (batch 1): every block's
    projections (the cross-attention's k, v over the text tokens, the rest over the video
    tokens) and the attention products q k^T and p v per head."""
    H, Dh = dit.config.num_heads, dit.config.head_dim
    pairs = []
    for block in dit.blocks:
        for name, w in block.named_parameters():
            if w.dim() == 2 and name.endswith(".weight"):  # (out, in): rows @ w.T
                rows = text_tokens if name.startswith(("cross_attn.k.", "cross_attn.v.")) else tokens
                pairs.append((torch.randn(rows, w.shape[1]), torch.randn(w.shape[1], w.shape[0])))
        for kv in (tokens, text_tokens):  # self-, then cross-attention
            pairs += [(torch.randn(H, tokens, Dh), torch.randn(H, Dh, kv)), (torch.randn(H, tokens, kv), torch.randn(H, kv, Dh))]
    return pairs


def gemm_floor(dit, tokens: int, text_tokens: int) -> dict:
    """What the step's arithmetic alone costs here: its FLOPs, the time of its matrix products
    run back to back at their own shapes (no norms, no elementwise ops, no dispatch between
    layers), and its time at this CPU's square-GEMM rate (the roofline)."""
    pairs = _products(dit, tokens, text_tokens)
    flops = sum(2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1) for a, b in pairs)

    def run():
        for a, b in pairs:
            torch.matmul(a, b)

    gemm = median_seconds(run, torch.device("cpu"), repeat=15, warmup=3)
    return {"gflop": flops / 1e9, "gemm_seconds": gemm, "roofline_seconds": flops / (cpu_matmul_GFLOPs() * 1e9)}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from flgengine.export import export_engine

    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    root = tmp_path_factory.mktemp("bench-export")
    bundle = _student_bundle(root / "shapes-student")
    dirs = {fmt: root / fmt for fmt in ("onnx", "aoti")}
    errors = {}
    for fmt, out in dirs.items():
        m = export_engine(bundle, fmt, out, max_batch=2, progress=False)
        errors[fmt] = m.verification.rel_error
    return bundle, dirs, errors


def test_dit_step_eager_vs_engines(benchmark, engines):
    from flgengine.export import load_engine

    bundle, dirs, errors = engines
    pipe = flgengine.load(bundle, device="cpu", dtype="fp32")
    x, t, ctx = _student_inputs(pipe, torch.Generator().manual_seed(1))
    runs = {"eager": pipe.dit, "eager_ref": None, **{fmt: load_engine(d) for fmt, d in dirs.items()}}
    cpu = torch.device("cpu")
    seconds = {}
    with torch.no_grad():
        for name, run in runs.items():
            if name == "eager_ref":
                pipe.dit.backend = "ref"
                seconds[name] = median_seconds(lambda: pipe.dit(x, t, ctx), cpu, repeat=15, warmup=3)
                pipe.dit.backend = None
                continue
            seconds[name] = median_seconds(lambda run=run: run(x, t, ctx), cpu, repeat=15, warmup=3)
        benchmark.pedantic(lambda: runs["aoti"](x, t, ctx), rounds=5, iterations=1, warmup_rounds=1)
    ratios = {k: seconds["eager"] / v for k, v in seconds.items()}
    # how far each is from the arithmetic: x (1, C, F, H, W) -> F*H*W / patch tokens
    patch = pipe.dit.config.patch_size
    tokens = x.shape[2] // patch[0] * (x.shape[3] // patch[1]) * (x.shape[4] // patch[2])
    floor = gemm_floor(pipe.dit, tokens, ctx.shape[1])
    benchmark.extra_info.update({"seconds": seconds, "speedup_vs_eager": ratios, "rel_error": errors,
                                 "threads": torch.get_num_threads(), **floor})
    print(f"\nDiT step, shapes student ({len(pipe.dit.blocks)} blocks), {torch.get_num_threads()} thread(s): "
          + ", ".join(f"{k} {v * 1e3:.2f} ms ({ratios[k]:.2f}x)" for k, v in seconds.items())
          + f"; rel. error vs PyTorch: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
          + f"\n  its arithmetic: {floor['gflop']:.3f} GFLOP; its matrix products alone {floor['gemm_seconds'] * 1e3:.2f} ms "
          + f"(eager {seconds['eager'] / floor['gemm_seconds']:.2f}x, aoti {seconds['aoti'] / floor['gemm_seconds']:.2f}x of "
          + f"that); at the square-GEMM rate ({cpu_matmul_GFLOPs():.0f} GFLOP/s) {floor['roofline_seconds'] * 1e3:.2f} ms")


def test_generate_eager_vs_engines(benchmark, engines):
    bundle, dirs, _ = engines
    pipes = {"eager": flgengine.load(bundle, device="cpu", dtype="fp32"),
             **{fmt: flgengine.load(bundle, engine=d) for fmt, d in dirs.items()}}
    cpu = torch.device("cpu")
    seconds, videos = {}, {}
    for name, pipe in pipes.items():
        videos[name] = pipe("a red circle moving left", seed=0, progress=False)
        seconds[name] = median_seconds(lambda pipe=pipe: pipe("a red circle moving left", seed=0, progress=False),
                                       cpu, repeat=7, warmup=1)
    benchmark.pedantic(lambda: pipes["aoti"]("a red circle moving left", seed=0, progress=False), rounds=3, iterations=1)
    diff = {k: int((v.int() - videos["eager"].int()).abs().max()) for k, v in videos.items()}
    ratios = {k: seconds["eager"] / v for k, v in seconds.items()}
    benchmark.extra_info.update({"seconds": seconds, "speedup_vs_eager": ratios, "max_uint8_diff": diff})
    print(f"\ngenerate(), 4 steps, 9 frames 32x32: " + ", ".join(f"{k} {v * 1e3:.1f} ms ({ratios[k]:.2f}x)"
                                                         for k, v in seconds.items())
          + f"; max |video - eager| (uint8): {diff}")


# ---- GPU: the whole 4-step loop, eager vs one CUDA graph (vs an AOTInductor engine) ------------



def _gpu_loop_inputs(size, tmp_path):
    """(bf16 CUDA DiT, noise, context, generator) for the 4-step loop benchmarks."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    if size == "wan1.3b-480p":
        cfg, latent, ctx_shape = ModelConfig(**WAN_1_3B_STUDENT), (16, 21, 60, 104), (1, 512, 4096)
    else:
        student = flgengine.load(_student_bundle(tmp_path / "student"), dtype="fp32")
        x, _, c = _student_inputs(student, torch.Generator().manual_seed(0))
        cfg, latent, ctx_shape = student.dit.config, tuple(x.shape[1:]), tuple(c.shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = DiT(cfg).cast(dtype).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    noise = randn((1, *latent), gen, device, dtype)
    ctx = torch.randn(ctx_shape, generator=gen).to(device, dtype)
    return model, noise, ctx, gen


def _report(benchmark, what, seconds, model):
    ratios = {k: seconds["eager"] / v for k, v in seconds.items()}
    benchmark.extra_info.update({"seconds": seconds, "speedup_vs_eager": ratios, "blocks": len(model.config.kept_blocks)})
    print(f"\nfew-step loop (4 DiT calls + sampler), {what}, bf16: "
          + ", ".join(f"{k} {v * 1e3:.2f} ms ({ratios[k]:.2f}x)" for k, v in seconds.items()))


@pytest.mark.gpu
@pytest.mark.parametrize("size", ["shapes-student", "wan1.3b-480p"])
def test_gpu_fewstep_loop_eager_vs_cuda_graph(benchmark, size, tmp_path):
    from flgengine.cudagraph import GraphedFewStepLoop

    model, noise, ctx, gen = _gpu_loop_inputs(size, tmp_path)
    sampler = FewStepSampler([1.0, 0.9, 0.75, 0.5])
    with torch.no_grad():
        graph = GraphedFewStepLoop(sampler, model, noise, ctx)
        runs = {"eager": lambda: sampler.sample(model, noise, ctx, generator=gen),
                "cuda_graph": lambda: graph(noise, ctx, None, gen)}
        repeat = 3 if size == "wan1.3b-480p" else 20
        seconds = {k: median_seconds(run, noise.device, repeat=repeat, warmup=1) for k, run in runs.items()}
        benchmark.pedantic(runs["cuda_graph"], rounds=3, iterations=1, warmup_rounds=1)
    _report(benchmark, size, seconds, model)


@pytest.mark.gpu
def test_gpu_fewstep_loop_aoti_engine(benchmark, tmp_path):
    """The shapes student's 4-step loop through an AOTInductor CUDA engine (bf16, static shapes) vs eager."""
    from flgengine.export import export_engine, load_engine

    model, noise, ctx, gen = _gpu_loop_inputs("shapes-student", tmp_path)
    sampler = FewStepSampler([1.0, 0.9, 0.75, 0.5])
    bundle = save_bundle(tmp_path / "b", model.float())
    model.cast(torch.bfloat16)
    export_engine(bundle, "aoti", tmp_path / "aoti", device="cuda", dtype="bf16", latent=tuple(noise.shape[2:]),
                  text_len=ctx.shape[1], dynamic=(), progress=False)
    engine = load_engine(tmp_path / "aoti")
    with torch.no_grad():
        runs = {"eager": lambda: sampler.sample(model, noise, ctx, generator=gen),
                "aoti": lambda: sampler.sample(engine, noise, ctx, generator=gen)}
        seconds = {k: median_seconds(run, noise.device, repeat=20, warmup=1) for k, run in runs.items()}
        benchmark.pedantic(runs["aoti"], rounds=3, iterations=1, warmup_rounds=1)
    _report(benchmark, "shapes-student", seconds, model)
