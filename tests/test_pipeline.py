"""generate(), Pipeline and the CLI on tiny random Wan bundles (umT5 + Wan VAE + DiT)."""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import flgengine  # noqa: E402
from flgengine.__main__ import main as cli  # noqa: E402
from tiny_wan import make_tiny_wan_bundle  # noqa: E402


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_wan_bundle(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_tiny_wan_bundle(tmp_path_factory.mktemp("student"), student=True)


@pytest.fixture(scope="module")
def pipe(teacher):
    return flgengine.load(teacher)


def test_generate_end_to_end_writes_a_playable_mp4(teacher, tmp_path):
    import imageio.v3 as iio

    out = tmp_path / "v.mp4"
    video = flgengine.generate("a red cat runs", model=teacher, seed=3, output=out, progress=False)
    assert video.dtype == torch.uint8 and video.shape == (1, 9, 64, 64, 3)
    frames = iio.imread(out)
    assert frames.shape == (9, 64, 64, 3)
    assert abs(frames.astype(float).mean() - video.float().mean().item()) < 8  # lossy codec, same content


def test_seeds_are_honoured(pipe):
    a = pipe("a dog", seed=1, progress=False)
    b = pipe("a dog", seed=1, progress=False)
    c = pipe("a dog", seed=2, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batch_gives_one_video_per_prompt_and_matches_single_runs(pipe, tmp_path):
    v = pipe(["a dog", "the sun shines"], seed=5, progress=False, output=tmp_path / "b.gif")
    assert v.shape[0] == 2
    assert (tmp_path / "b_0.gif").is_file() and (tmp_path / "b_1.gif").is_file()
    assert not torch.equal(v[0], v[1])  # different prompts, different videos


def test_pipeline_exposes_its_parts(pipe):
    assert pipe.dit.config.num_layers == 4 and pipe.text_encoder.text_dim == 32
    assert pipe.codec.temporal_factor == 4 and pipe.sampler.num_steps == 8 and pipe.config.fps == 8


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_frames=8), "4k\\+1"),
    (dict(height=60), "height=60 must be a multiple of 16"),
    (dict(width=0), "width must be a positive integer"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(guidance=-1.0), "guidance must be a number >= 0"),
    (dict(output="v.avi"), "must end in .mp4 or .gif"),
])
def test_bad_arguments_fail_before_compute(pipe, kwargs, match, monkeypatch):
    monkeypatch.setattr(pipe.dit, "forward", lambda *a: pytest.fail("DiT ran before the check"))
    with pytest.raises(ValueError, match=match):
        pipe("a dog", progress=False, **kwargs)


def test_bad_prompts(pipe):
    with pytest.raises(ValueError, match="non-empty list"):
        pipe([], progress=False)
    with pytest.raises(ValueError, match="every prompt must be a string"):
        pipe(["ok", 3], progress=False)


def test_student_refuses_other_steps_and_cfg_unless_forced(student):
    p = flgengine.load(student)
    assert p.sampler.num_steps == 4 and p.config.distilled
    with pytest.raises(ValueError, match="distilled for 4 steps, not 8"):
        p("a dog", steps=8, progress=False)
    with pytest.raises(ValueError, match="CFG baked in"):
        p("a dog", guidance=5.0, progress=False)
    assert p("a dog", steps=2, force=True, progress=False).shape == (1, 9, 64, 64, 3)
    calls = []
    p.dit.forward = lambda x, t, c, f=p.dit.forward: calls.append(x.shape[0]) or f(x, t, c)
    p("a dog", progress=False)
    assert calls == [1, 1, 1, 1]  # 4 steps, no CFG batch doubling


def test_teacher_cfg_runs_cond_and_uncond_in_one_batch(pipe):
    calls = []
    orig = pipe.dit.forward
    pipe.dit.forward = lambda x, t, c: calls.append(x.shape[0]) or orig(x, t, c)
    try:
        pipe("a dog", progress=False)
        assert calls == [2] * 8
        calls.clear()
        pipe("a dog", guidance=1.0, progress=False)  # guidance 1: no CFG
        assert calls == [1] * 8
    finally:
        pipe.dit.forward = orig


def test_backends_give_the_same_video(teacher):
    a = flgengine.generate("a dog", model=teacher, backend="ref", progress=False)
    b = flgengine.generate("a dog", model=teacher, backend="cpu", progress=False)
    assert (a.int() - b.int()).abs().max() <= 1


def test_dit_only_bundle_and_missing_default_are_clear(tmp_path):
    from flgengine.bundle import save_bundle
    from flgengine.model import DiT
    from helpers import tiny_config

    save_bundle(tmp_path / "dit", DiT(tiny_config()))
    with pytest.raises(ValueError, match="DiT-only"):
        flgengine.generate("x", model=tmp_path / "dit", progress=False)
    with pytest.raises(FileNotFoundError, match="neither a bundle directory nor a shipped model"):
        flgengine.load(tmp_path / "nowhere")


def test_cli_generate_and_info(teacher, tmp_path, capsys):
    out = tmp_path / "cli.mp4"
    assert cli(["generate", "a blue bird flies", "--model", str(teacher), "-o", str(out), "--seed", "4", "--quiet"]) == 0
    assert out.stat().st_size > 0
    api = flgengine.generate("a blue bird flies", model=teacher, seed=4, progress=False)
    import imageio.v3 as iio
    assert abs(iio.imread(out).astype(float).mean() - api.float().mean().item()) < 8

    assert cli(["info", str(teacher), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] > 0 and info["kept_blocks"] == [0, 1, 2, 3] and info["sampler"]["num_steps"] == 8

    assert cli(["info", "--json"]) == 0
    build = json.loads(capsys.readouterr().out)
    assert {"adaln_modulate", "gated_residual_adaln", "qk_norm_rope", "attention"} <= set(build["op_backends"])
    assert "cuda" in build["build"]

    # the shipped student, in words: its stages one line each, its evaluation
    assert cli(["info", "shapes-4step"]) == 0
    text = capsys.readouterr().out
    from flgengine.pipeline import resolve_model

    stages = json.loads((resolve_model("shapes-4step") / "provenance.json").read_text())["stages"]
    plan, stage3 = stages[0], next(s for s in stages if s["stage"] == "stage3")
    assert "FastLightGen student" in text and f"- plan: dropped blocks {plan['drop']}" in text
    assert f"- stage3: {stage3['steps']} steps" in text and "evaluation: 180 videos, 4 steps: adherence" in text
    assert "in fp8: 180 videos, 4 steps: adherence" in text  # the student measured in each precision
    assert "- store: weights stored in int8 (were float16)" in text and "- store: weights stored in int4 (were int8)" in text
    assert cli(["info", "shapes-4step", "--json"]) == 0
    weights = json.loads(capsys.readouterr().out)["weights"]
    stored = resolve_model("shapes-4step") / "model.safetensors"
    assert weights == {"stored": "int4", "mib": round(stored.stat().st_size / 2**20, 2)}

    assert cli(["generate", "x", "--model", str(teacher), "--frames", "8", "--quiet"]) == 2
    assert "4k+1" in capsys.readouterr().err


def test_cli_help_runs_as_a_module():
    r = subprocess.run([sys.executable, "-m", "flgengine", "generate", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--frames" in r.stdout and "--backend" in r.stdout


def test_sizes_beyond_the_position_table_and_unknown_words_are_caught_before_compute(caplog):
    import logging

    import flgengine

    pipe = flgengine.load("shapes-4step", device="cpu")
    calls = []
    forward = pipe.dit.forward
    pipe.dit.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    with pytest.raises(ValueError, match="num_frames=10, height=32, width=32: this model's position table covers "
                                         "at most 9 frames of 32 x 32"):
        pipe("a red circle moving left", num_frames=10, progress=False)
    with pytest.raises(ValueError, match="position table covers at most 9 frames of 32 x 32"):
        pipe("a red circle moving left", height=40, progress=False)
    assert calls == []  # refused before the DiT ran
    with caplog.at_level(logging.WARNING, logger="flgengine"):
        video = pipe(["a purple hexagon dancing", "a red circle moving left"], progress=False)
    assert video.shape[0] == 2 and len(calls) == 4
    warned = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert len(warned) == 1 and "'purple', 'hexagon', 'dancing'" in warned[0] and "'red'" not in warned[0]


def test_the_default_model_generates_without_compiler_imports():
    # loading and running the default model must not import torch._dynamo, triton, onnx or diffusers
    import subprocess
    import sys

    code = ("import sys, flgengine; flgengine.generate('a red circle moving left', progress=False); "
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor', 'triton', 'onnx', 'onnxruntime', "
            "'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink"])
def test_pipeline_json_cannot_point_outside_the_bundle(tmp_path, where):
    import json
    import os
    import shutil

    import flgengine
    from flgengine.bundle import BundleError

    outside = tmp_path / "elsewhere"
    shutil.copytree("flgengine/assets/shapes-4step/text_encoder", outside)
    bundle = tmp_path / "b"
    shutil.copytree("flgengine/assets/shapes-4step", bundle, ignore=shutil.ignore_patterns("text_encoder"))
    if where == "symlink":
        os.symlink(outside, bundle / "text_encoder")
        value = "text_encoder"
    else:
        value = "../elsewhere" if where == "dotdot" else str(outside)
    cfg = json.loads((bundle / "pipeline.json").read_text())
    cfg["text_encoder"]["path"] = value
    (bundle / "pipeline.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=f"text_encoder.path = {value!r} leads outside the bundle"):
        flgengine.load(bundle)
    pipe = flgengine.load(bundle, allow_outside_paths=True)  # the caller trusts it
    assert pipe("a red circle moving left", progress=False).shape == (1, 9, 32, 32, 3)


def test_threads_with_different_backends_and_precisions_keep_their_own_results():
    # the backend / precision of one call must not leak into another running at the same time
    from concurrent.futures import ThreadPoolExecutor

    import flgengine

    pipes = {"ref": flgengine.load(backend="ref"), "cpu": flgengine.load(backend="cpu"),
             "fp8": flgengine.load(precision="fp8")}
    run = lambda name: pipes[name](["a red circle moving left", "a blue square moving up"], seed=3,  # noqa: E731
                                   progress=False)
    alone = {name: run(name) for name in pipes}
    assert not torch.equal(alone["fp8"], alone["ref"])  # they differ: a leak would show
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(run, [name for name in pipes for _ in range(2)]))
    for i, name in enumerate(n for n in pipes for _ in range(2)):
        assert torch.equal(together[i], alone[name]), name
    with pytest.raises(ValueError):  # a failed call ...
        pipes["ref"]("a red circle moving left", num_frames=10, progress=False)
    assert torch.equal(run("ref"), alone["ref"])  # ... leaves the pipeline as it was
