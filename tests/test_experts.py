"""Two-expert models (Wan2.2's high-/low-noise split): routing, the low-noise expert's training
run, the bundle that holds both, and what refuses them."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import flgengine
from flgengine import ops
from flgengine.bundle import LOW_NOISE_DIR, BundleError, load_bundle
from flgengine.convert import to_diffusers
from flgengine.model import DiT, TwoExpertDiT, main_expert
from flgengine.sampling import build_sampler
from helpers import assert_close, tiny_config

TINY = dict(num_layers=4, ffn_dim=64, num_heads=2, head_dim=16, text_dim=16, freq_dim=16, warmup=1, checkpoint_every=2)


def test_each_sample_runs_on_the_expert_of_its_noise_level():
    torch.manual_seed(0)
    high, low = DiT(tiny_config()).eval(), DiT(tiny_config()).eval()
    model = TwoExpertDiT(high, low, 0.3)
    x = torch.randn(4, high.config.in_channels, 3, 8, 8)
    ctx = torch.randn(4, 5, high.config.text_dim)
    t = torch.tensor([900.0, 300.0, 299.0, 50.0])  # t <= 300 is the low expert's (boundary 0.3)
    out = model(x, t, ctx)
    for i, net in enumerate((high, low, low, low)):
        assert torch.allclose(out[i:i + 1], net(x[i:i + 1], t[i:i + 1], ctx[i:i + 1]), atol=1e-5), i
    assert torch.equal(model(x[:1], t[:1], ctx[:1]), high(x[:1], t[:1], ctx[:1]))  # one side: no split
    assert model.num_params() == high.num_params() + low.num_params() and main_expert(model) is high
    model.backend = "ref"  # the pair's ops backend: both experts' ops run on it
    picked, pick = [], ops.registry.pick
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops.registry, "pick", lambda *a: picked.append(pick(*a)) or picked[-1])
        model(x, t, ctx)
    assert {name for name, _ in picked} == {"ref"} and high.backend is None and low.backend is None
    with pytest.raises(ValueError, match="boundary"):
        TwoExpertDiT(high, low, 1.5)
    with pytest.raises(ValueError, match="text_dim"):
        TwoExpertDiT(high, DiT(tiny_config(text_dim=8)), 0.3)


def test_block_skipping_acts_on_the_high_noise_expert():
    from distill.importance import skip_blocks

    torch.manual_seed(0)
    high, low = DiT(tiny_config()).eval(), DiT(tiny_config()).eval()
    model = TwoExpertDiT(high, low, 0.3)
    x, ctx = torch.randn(2, high.config.in_channels, 3, 8, 8), torch.randn(2, 5, high.config.text_dim)
    t = torch.tensor([900.0, 100.0])
    full = model(x, t, ctx)
    with skip_blocks(model, [1]):
        assert len(high.blocks) == len(high.config.kept_blocks) - 1 and len(low.blocks) == len(low.config.kept_blocks)
        skipped = model(x, t, ctx)
    assert not torch.allclose(skipped[0], full[0]) and torch.equal(skipped[1], full[1])
    assert len(high.blocks) == len(high.config.kept_blocks)


@pytest.fixture(scope="module")
def two_expert_teacher(tmp_path_factory):
    from distill.teacher import TeacherConfig, train_teacher

    root = tmp_path_factory.mktemp("experts")
    teacher = train_teacher(TeacherConfig(steps=2, batch_size=2, **TINY), root / "teacher", progress=False)["bundle"]
    result = train_teacher(TeacherConfig(steps=2, batch_size=2, **TINY, expert_of=teacher, t_max=0.3, boundary=0.25),
                           root / "low", progress=False)
    return Path(teacher), Path(result["bundle"])


def test_the_low_noise_expert_run_makes_a_two_expert_bundle(two_expert_teacher):
    teacher, path = two_expert_teacher
    one, two = load_bundle(teacher), load_bundle(path)
    assert isinstance(one.model, DiT) and isinstance(two.model, TwoExpertDiT) and two.model.boundary == 0.25
    assert two.pipeline.low_noise_boundary == 0.25 and one.pipeline.low_noise_boundary is None
    # the teacher's DiT is the high-noise expert, unchanged; the low one trained from its weights
    assert all(torch.equal(v, two.model.high.state_dict()[k]) for k, v in one.model.state_dict().items())
    low = two.model.low.state_dict()
    assert any(not torch.equal(v, low[k]) for k, v in one.model.state_dict().items())
    assert two.model.low.config.x0_prediction == 0.05 and two.model.low.config.velocity_skip is None
    # the text encoder is the teacher's, frozen: both experts read the same context
    for name in ("model.safetensors", "config.json"):
        assert (path / "text_encoder" / name).read_bytes() == (one.path / "text_encoder" / name).read_bytes()
    stages = json.loads((path / "provenance.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["train-teacher", "train-low-noise-expert"]
    assert stages[1]["boundary"] == 0.25 and stages[1]["recipe"]["t_max"] == 0.3
    video = flgengine.generate("a red circle moving left", model=path, steps=4, seed=0, progress=False)
    assert video.shape == (1, 9, 32, 32, 3)


def test_the_low_noise_steps_take_the_bundles_low_noise_guidance(two_expert_teacher, tmp_path):
    import shutil

    _, path = two_expert_teacher
    pipe = flgengine.load(path)  # the expert run writes its recipe's guidance 2.5 and low_noise_guidance 1
    s = pipe.sampler
    assert s.boundary == 0.25 and s.guidance_at(900.0) == 2.5 and s.guidance_at(250.0) == 1.0
    assert pipe._sampler_for(steps=10, guidance=None, force=False).guidance_at(100.0) == 1.0
    assert pipe._sampler_for(steps=None, guidance=2.0, force=False).guidance_at(100.0) == 2.0  # guidance= sets all
    edited = tmp_path / "g2"
    shutil.copytree(path, edited)
    cfg = json.loads((edited / "pipeline.json").read_text())
    cfg["sampler"]["low_noise_guidance"] = None  # every step at the bundle's guidance
    (edited / "pipeline.json").write_text(json.dumps(cfg))
    every = flgengine.load(edited)
    assert every.sampler.guidance_at(250.0) == 2.5
    a = pipe("a red circle moving left", seed=0, steps=12, progress=False)
    b = every("a red circle moving left", seed=0, steps=12, progress=False)
    assert not torch.equal(a, b)
    from distill.evaluate import evaluate_bundle

    r = evaluate_bundle(pipe, samples=2, steps=12, batch_size=2, progress=False)
    assert r["low_noise_boundary"] == 0.25 and r["low_noise_guidance"] == 1.0  # recorded beside the guidance
    from distill.compare import dit_calls

    # 12 steps at shift 2: one sigma (1/12 -> 0.154) is <= 0.25, run without CFG: 11 x 2 + 1 DiT calls
    assert dit_calls(pipe, 12, r["guidance"]) == 23 and dit_calls(every, 12, r["guidance"]) == 24


def test_two_expert_bundles_are_refused_where_one_dit_is_needed(two_expert_teacher, tmp_path):
    import shutil

    from distill.teacher import TeacherConfig, train_teacher
    from flgengine.export import export_engine

    _, path = two_expert_teacher
    with pytest.raises(ValueError, match="two experts"):
        to_diffusers(path, tmp_path / "wan")
    with pytest.raises(ValueError, match="two DiTs"):
        export_engine(path, "onnx", tmp_path / "engine", progress=False)
    with pytest.raises(ValueError, match="already has a low-noise expert"):
        train_teacher(TeacherConfig(steps=1, batch_size=2, **TINY, expert_of=str(path)), tmp_path / "again",
                      progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / LOW_NOISE_DIR / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="low_noise_boundary"):
        load_bundle(broken)
    with pytest.raises(ValueError, match="t_max"):
        TeacherConfig(t_max=0.0)


def test_distilling_a_two_expert_teacher_prunes_the_high_noise_expert(two_expert_teacher, tmp_path, monkeypatch):
    from distill import stage3
    from distill.run import RunConfig, run

    _, path = two_expert_teacher
    seen = {}
    train = stage3.train_stage3

    def spy(real, plan, data, cfg, out, evaluate=None, init=None, progress=True, regression_target=None):
        seen.update(real=real, init=init, target=regression_target, data=data)
        return train(real, plan, data, cfg, out, evaluate=evaluate, init=init, progress=progress,
                     regression_target=regression_target)

    monkeypatch.setattr(stage3, "train_stage3", spy)
    cfg = dict(teacher=str(path), out=str(tmp_path / "run"), importance={"samples": 2, "num_t": 2, "batch_size": 4},
               plan={"budget": 0.3}, stage2={"steps": 1, "batch_size": 2, "eval_every": 1, "eval_batch": 2},
               stage3={"steps": 1, "batch_size": 2, "fake_updates": 1, "checkpoint_every": 1, "low_noise_b1": 1.0,
                       "regression": 0.1},
               evaluate=None)
    result = run(RunConfig(**cfg), progress=False)
    teacher = load_bundle(path).model
    # the real score: the Stage II network above the boundary, the teacher's low-noise expert whole below
    assert isinstance(seen["real"], TwoExpertDiT) and isinstance(seen["init"], DiT)
    assert seen["real"].boundary == 0.25 and seen["real"].high is seen["init"]
    assert all(torch.equal(v, seen["real"].low.state_dict()[k]) for k, v in teacher.low.state_dict().items())
    student = load_bundle(result["bundle"])
    assert isinstance(student.model, DiT) and student.pipeline.low_noise_boundary is None
    assert student.model.config.num_layers == 4 and len(student.model.blocks) < 4 and student.model.config.x0_prediction is None
    assert load_bundle(tmp_path / "run" / "stage2" / "bundle").pipeline.low_noise_boundary is None
    # Stage III's regression target: the teacher's own sampler (both experts, its guidance) at 4 steps
    x0, ctx = seen["data"].batch(0, 2)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    bundle = load_bundle(path)
    sampler = build_sampler(dataclasses.replace(bundle.pipeline.sampler, num_steps=4), bundle.pipeline.low_noise_boundary)
    expected = sampler.sample(bundle.model, noise, ctx, seen["data"].uncond.expand(2, -1, -1))
    assert_close(seen["target"](noise, ctx), expected, 1e-5, "regression target")


def test_an_image_to_video_teacher_fine_tunes_from_a_text_to_video_one(two_expert_teacher, tmp_path):
    """init_from + image: the main (high-noise) DiT with its patch embedding widened by the mask and
    first-frame channels at zero (so it starts as that DiT exactly), trained on clips whose first
    frame it is given; the bundle takes an image (pipeline.json image "concat")."""
    from distill.data import first_frame_condition
    from distill.teacher import TeacherConfig, _build, train_teacher

    _, two = two_expert_teacher
    cfg = TeacherConfig(steps=2, batch_size=2, init_from=str(two), image="concat")
    start, _ = _build(cfg)
    high = load_bundle(two).model.high
    g = torch.Generator().manual_seed(0)
    x, clip = torch.randn(2, 3, 9, 32, 32, generator=g), torch.rand(2, 3, 9, 32, 32, generator=g) * 2 - 1
    ctx = torch.randn(2, 8, high.config.text_dim, generator=g)
    t = torch.tensor([900.0, 100.0])
    with torch.no_grad():
        assert torch.equal(start(torch.cat([x, first_frame_condition(clip)], 1), t, ctx), high(x, t, ctx))
    cond = first_frame_condition(clip)
    assert torch.equal(cond[:, 0, 0], torch.ones(2, 32, 32)) and not cond[:, 0, 1:].any()
    assert torch.equal(cond[:, 1:, 0], clip[:, :, 0]) and not cond[:, 1:, 1:].any()
    result = train_teacher(cfg, tmp_path / "i2v", progress=False)
    pipe = flgengine.load(result["bundle"], device="cpu")
    assert pipe.config.image == "concat" and pipe.dit.config.in_channels == 7 and pipe.config.low_noise_boundary is None
    first = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=g)
    video = pipe("a red circle moving left", image=first, seed=0, steps=2, progress=False)
    assert video.shape == (1, 9, 32, 32, 3)


def test_a_first_frame_teacher_keeps_its_inputs_and_learns_the_other_frames(two_expert_teacher, tmp_path):
    """image "first_frame": no new channels (the run starts as the teacher's DiT), frame 0 given
    clean at t = 0, the loss on frames 1..; the bundle samples with frame 0 kept exactly."""
    from distill.teacher import TeacherConfig, flow_loss, train_teacher

    _, two = two_expert_teacher
    cfg = TeacherConfig(steps=2, batch_size=2, init_from=str(two), image="first_frame")
    assert cfg.model_config().in_channels == 3 and cfg.pipeline_config().image == "first_frame"
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x, t, context):
            seen.update(x=x, t=t)
            return torch.zeros_like(x)

    text = lambda prompts: torch.zeros(len(prompts), 8, 16)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    clip = torch.rand(2, 3, 9, 32, 32, generator=g) * 2 - 1
    loss = flow_loss(Spy(), text, clip, ["a", "b"], g, 0.0, image="first_frame", patch=(1, 8, 8))
    assert torch.equal(seen["x"][:, :, 0], clip[:, :, 0]) and seen["t"].shape == (2, 9 * 16)
    assert (seen["t"][:, :16] == 0).all() and (seen["t"][:, 16:] > 0).all()
    assert loss > 0
    result = train_teacher(cfg, tmp_path / "ff", progress=False)
    pipe = flgengine.load(result["bundle"], device="cpu")
    first = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=g)
    video = pipe("a red circle moving left", image=first, seed=0, steps=2, progress=False)
    assert torch.equal(video[0, 0], first)  # pixel codec: frame 0 is the image itself


def test_two_experts_take_per_token_timesteps_by_their_noisiest_token(two_expert_teacher):
    """first_frame image models: frame 0's tokens at t = 0 beside noisy ones; the noisy tokens'
    level picks the expert, which gets the per-token t."""
    _, two = two_expert_teacher
    model = load_bundle(two).model
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 3, 9, 32, 32, generator=g), torch.randn(2, 8, model.config.text_dim, generator=g)
    S = 9 * 16
    t = torch.tensor([[900.0], [100.0]]).expand(2, S).clone()
    t[:, :16] = 0.0  # frame 0
    with torch.no_grad():
        out = model(x, t, ctx)
        assert torch.equal(out[:1], model.high(x[:1], t[:1], ctx[:1]))  # max 900 > 1000 * 0.25: high
        assert torch.equal(out[1:], model.low(x[1:], t[1:], ctx[1:]))  # max 100: low
