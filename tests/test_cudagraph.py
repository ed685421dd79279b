"""The student's whole few-step loop as one CUDA graph (and an AOTInductor engine on CUDA).

The bundle here needs nothing past torch (token text encoder, pixel codec), so these run
on GPU machines without diffusers or onnxruntime. GPU tests skip without CUDA.
"""

import pytest
import torch

import flgengine
from flgengine.bundle import save_bundle
from flgengine.config import CodecConfig, PipelineConfig, SamplerConfig, TextEncoderConfig
from flgengine.model import DiT
from flgengine.sampling import FewStepSampler, randn
from flgengine.text import TokenTextEncoder
from helpers import tiny_config

VOCAB = ["red", "blue", "circle", "square", "moves", "left", "right"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny distilled student: 3 of 4 blocks, 4 steps, token text encoder, pixel codec (8 frames of 16x16)."""
    path = tmp_path_factory.mktemp("token-student")
    torch.manual_seed(0)
    TokenTextEncoder(VOCAB, max_length=6, dim=12).save(path / "text_encoder")
    pipeline = PipelineConfig(
        text_encoder=TextEncoderConfig(kind="tokens", path="text_encoder", max_length=6), codec=CodecConfig(kind="pixel"),
        sampler=SamplerConfig(kind="fewstep", num_steps=4, shift=2.0, guidance=0.0, sigmas=[1.0, 0.9, 0.7, 0.4]),
        num_frames=8, height=16, width=16, fps=8, distilled=True)
    cfg = tiny_config(in_channels=3, out_channels=3, block_ids=[0, 1, 3])
    return save_bundle(path, DiT(cfg), pipeline, {"kind": "test student"})


def test_few_step_sampler_with_predrawn_noises_is_the_seeded_loop(student):
    """The graph draws the re-noising up front; that must be the same random stream."""
    pipe = flgengine.load(student, device="cpu")
    sampler = pipe.sampler
    ctx = pipe.text_encoder.encode(["a red circle"])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    eager = sampler.sample(pipe.dit, randn((1, 3, 8, 16, 16), g1, "cpu"), ctx, generator=g1)
    noise = randn((1, 3, 8, 16, 16), g2, "cpu")
    noises = sampler.draw_noises(noise.shape, g2, "cpu")
    assert len(noises) == 3
    assert torch.equal(eager, sampler.sample(pipe.dit, noise, ctx, noises=noises))
    with pytest.raises(ValueError, match="noises must hold 3 tensors"):
        sampler.sample(pipe.dit, noise, ctx, noises=noises[:1])


def test_cuda_graph_flag_on_cpu(student):
    pipe = flgengine.load(student, device="cpu")
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        pipe("a red circle", cuda_graph=True, progress=False)
    with pytest.raises(ValueError, match="cuda_graph must be True, False or None"):
        pipe("a red circle", cuda_graph="yes", progress=False)
    pipe("a red circle", progress=False)  # default on the CPU: the eager loop
    assert pipe._graphs == {}


@pytest.mark.gpu
def test_cuda_graph_loop_gives_the_eager_video_and_honours_the_seed(student):
    pipe = flgengine.load(student, device="cuda", dtype="fp32", backend="ref")
    eager = [pipe("a red circle moves left", seed=s, progress=False, cuda_graph=False) for s in (1, 2)]
    graphed = [pipe("a red circle moves left", seed=s, progress=False, cuda_graph=True) for s in (1, 2)]
    assert len(pipe._graphs) == 1  # captured once, replayed for the second seed
    for e, g in zip(eager, graphed):
        assert (e.int() - g.int()).abs().max() <= 1
    assert not torch.equal(graphed[0], graphed[1])
    other = pipe("a blue square", seed=1, progress=False, cuda_graph=True)  # new prompt, same shapes: replay
    assert len(pipe._graphs) == 1
    assert (other.int() - pipe("a blue square", seed=1, progress=False, cuda_graph=False).int()).abs().max() <= 1
    pipe("a red circle", seed=1, progress=False)  # the default for a student on CUDA: the graph
    assert len(pipe._graphs) == 1
    pipe(["a red circle", "a blue square"], seed=1, progress=False)  # another batch: another graph
    assert len(pipe._graphs) == 2


@pytest.mark.gpu
def test_cuda_graph_in_bf16_with_automatic_backends(student):
    pipe = flgengine.load(student, device="cuda")  # bf16; fused ops where built
    eager = pipe("a red circle", seed=4, progress=False, cuda_graph=False)
    graphed = pipe("a red circle", seed=4, progress=False)
    assert pipe._graphs and (eager.int() - graphed.int()).abs().max() <= 1


@pytest.mark.gpu
def test_aoti_engine_on_cuda(student, tmp_path):
    from flgengine.export import export_engine, load_engine

    out = tmp_path / "aoti-cuda"
    m = export_engine(student, "aoti", out, device="cuda", dtype="bf16", max_batch=2, progress=False)
    assert m.device == "cuda" and m.dtype == "bfloat16" and m.verification.rel_error <= 3e-2
    engine = load_engine(out)
    with pytest.raises(ValueError, match="outside the engine's range 1..2"):
        engine(torch.randn(3, 3, 8, 16, 16, device="cuda", dtype=torch.bfloat16), torch.ones(3, device="cuda"),
               torch.randn(3, 6, 12, device="cuda", dtype=torch.bfloat16))
    want = flgengine.generate("a red circle", model=student, seed=2, device="cuda", progress=False, cuda_graph=False)
    got = flgengine.generate("a red circle", model=student, seed=2, engine=out, progress=False)
    assert got.shape == want.shape and (want.float() - got.float()).abs().mean() < 2
