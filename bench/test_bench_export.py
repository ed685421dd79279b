"""Engines on this CPU: a shapes-world-shaped student's DiT step and whole 4-step
generate(), eager PyTorch vs ONNX Runtime vs AOTInductor, as ratios measured in one run.

The student: the shapes teacher's architecture (Wan DiT, width 128 = 4 heads x 32, FFN
512, pixels patchified (1, 4, 4): 9 x 8 x 8 = 576 tokens, 8 word tokens of width 64)
with 2 of its 8 blocks removed (~30% of the blocks), random weights, a 4-step sampler,
the pixel codec and a token text encoder. Building it exports one ONNX file and compiles
one AOTInductor package (about two minutes on 2 cores).

GPU variants (`gpu` marker, run by `bench/device_check.sh`): the 4-step loop eager vs one
CUDA graph vs an AOTInductor CUDA engine for the same student, and eager vs CUDA graph for
a Wan2.1-1.3B-shaped student (21 of 30 blocks, width 1536) at 480p, bf16.

    pytest bench/test_bench_export.py -s
"""

import pytest
import torch

import flgengine
from flgengine.checkpoint import save_bundle
from flgengine.config import CodecConfig, ModelConfig, PipelineConfig, SamplerConfig, TextEncoderConfig
from flgengine.model import DiT
from timing import median_seconds

SHAPES_STUDENT = dict(in_channels=3, out_channels=3, patch_size=(1, 4, 4), num_heads=4, head_dim=32, ffn_dim=512,
                      text_dim=64, freq_dim=64, num_layers=8, rope_max_seq_len=64, block_ids=[0, 1, 3, 4, 6, 7])
VOCAB = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "moves", "left", "right", "up", "down"]


def _student_bundle(path):
    from flgengine.text import TokenTextEncoder

    torch.manual_seed(0)
    TokenTextEncoder(VOCAB, max_length=8, dim=64).save(path / "text_encoder")
    pipeline = PipelineConfig(
        text_encoder=TextEncoderConfig(kind="tokens", path="text_encoder", max_length=8), codec=CodecConfig(kind="pixel"),
        sampler=SamplerConfig(kind="fewstep", num_steps=4, shift=2.0, guidance=0.0, sigmas=[1.0, 0.9, 0.75, 0.5]),
        num_frames=9, height=32, width=32, fps=8, distilled=True)
    return save_bundle(path, DiT(ModelConfig(**SHAPES_STUDENT)), pipeline, {"kind": "bench: shapes-shaped random student"})


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
    pipe = flgengine.load(bundle, device="cpu")
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(1, 3, 9, 32, 32, generator=g), torch.tensor([900.0]), torch.randn(1, 8, 64, generator=g)
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
    benchmark.extra_info.update({"seconds": seconds, "speedup_vs_eager": ratios, "rel_error": errors,
                                 "threads": torch.get_num_threads()})
    print(f"\nDiT step, shapes-shaped student (6 blocks, 576 tokens), {torch.get_num_threads()} thread(s): "
          + ", ".join(f"{k} {v * 1e3:.2f} ms ({ratios[k]:.2f}x)" for k, v in seconds.items())
          + f"; rel. error vs PyTorch: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))


def test_generate_eager_vs_engines(benchmark, engines):
    bundle, dirs, _ = engines
    pipes = {"eager": flgengine.load(bundle, device="cpu"),
             **{fmt: flgengine.load(bundle, engine=d) for fmt, d in dirs.items()}}
    cpu = torch.device("cpu")
    seconds, videos = {}, {}
    for name, pipe in pipes.items():
        videos[name] = pipe("a red circle moves left", seed=0, progress=False)
        seconds[name] = median_seconds(lambda pipe=pipe: pipe("a red circle moves left", seed=0, progress=False),
                                       cpu, repeat=7, warmup=1)
    benchmark.pedantic(lambda: pipes["aoti"]("a red circle moves left", seed=0, progress=False), rounds=3, iterations=1)
    diff = {k: int((v.int() - videos["eager"].int()).abs().max()) for k, v in videos.items()}
    ratios = {k: seconds["eager"] / v for k, v in seconds.items()}
    benchmark.extra_info.update({"seconds": seconds, "speedup_vs_eager": ratios, "max_uint8_diff": diff})
    print(f"\ngenerate(), 4 steps, 9x32x32: " + ", ".join(f"{k} {v * 1e3:.1f} ms ({ratios[k]:.2f}x)"
                                                         for k, v in seconds.items())
          + f"; max |video - eager| (uint8): {diff}")


# ---- GPU: the whole 4-step loop, eager vs one CUDA graph (vs an AOTInductor engine) ------------

WAN_1_3B_STUDENT = dict(in_channels=16, out_channels=16, patch_size=(1, 2, 2), num_heads=12, head_dim=128,
                        ffn_dim=8960, text_dim=4096, freq_dim=256, num_layers=30,
                        block_ids=[i for i in range(30) if i not in (2, 5, 8, 11, 14, 17, 20, 23, 26)])


@pytest.mark.gpu
@pytest.mark.parametrize("size", ["shapes-student", "wan1.3b-480p"])
def test_gpu_fewstep_loop_eager_vs_cuda_graph(benchmark, size, tmp_path):
    from flgengine.cudagraph import GraphedFewStepLoop
    from flgengine.sampling import FewStepSampler, randn

    device, dtype = torch.device("cuda"), torch.bfloat16
    if size == "wan1.3b-480p":
        cfg, latent, ctx_shape = ModelConfig(**WAN_1_3B_STUDENT), (16, 21, 60, 104), (1, 512, 4096)
    else:
        cfg, latent, ctx_shape = ModelConfig(**SHAPES_STUDENT), (3, 9, 32, 32), (1, 8, 64)
    torch.manual_seed(0)
    with torch.device(device):
        model = DiT(cfg).cast(dtype).eval().requires_grad_(False)
    sampler = FewStepSampler([1.0, 0.9, 0.75, 0.5])
    gen = torch.Generator().manual_seed(0)
    noise = randn((1, *latent), gen, device, dtype)
    ctx = torch.randn(ctx_shape, generator=gen).to(device, dtype)
    runs = {"eager": lambda: sampler.sample(model, noise, ctx, generator=gen)}
    with torch.no_grad():
        graph = GraphedFewStepLoop(sampler, model, noise, ctx)
        runs["cuda_graph"] = lambda: graph(noise, ctx, None, gen)
        if size == "shapes-student":  # an AOTInductor CUDA engine of the same DiT (a small compile)
            from flgengine.export import export_engine, load_engine

            bundle = save_bundle(tmp_path / "b", model.float())
            model.cast(dtype)
            export_engine(bundle, "aoti", tmp_path / "aoti", device="cuda", dtype="bf16", latent=latent[1:],
                          text_len=ctx_shape[1], dynamic=(), progress=False)
            engine = load_engine(tmp_path / "aoti")
            runs["aoti"] = lambda: sampler.sample(engine, noise, ctx, generator=gen)
        repeat = 3 if size == "wan1.3b-480p" else 20
        seconds = {k: median_seconds(run, device, repeat=repeat, warmup=1) for k, run in runs.items()}
        benchmark.pedantic(runs["cuda_graph"], rounds=3, iterations=1, warmup_rounds=1)
    ratios = {k: seconds["eager"] / v for k, v in seconds.items()}
    benchmark.extra_info.update({"seconds": seconds, "speedup_vs_eager": ratios, "blocks": len(cfg.kept_blocks)})
    print(f"\nfew-step loop (4 DiT calls + sampler), {size}, bf16: "
          + ", ".join(f"{k} {v * 1e3:.2f} ms ({ratios[k]:.2f}x)" for k, v in seconds.items()))
