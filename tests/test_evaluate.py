"""distill.evaluator, distill.metrics, distill.evaluate: the shipped shapes-world evaluator, the quality
metrics and the evaluation of a bundle."""

import json
import shutil

import numpy as np
import pytest
import torch

from distill import evaluate as ev
from distill import evaluator as evr
from distill import metrics
from distill.worlds import shapes as world
from flgengine.bundle import BundleError

FRESH_SEED = 777  # neither the evaluator's training nor its held-out stream


@pytest.fixture(scope="module")
def evaluator():
    return evr.load_evaluator()


@pytest.fixture(scope="module")
def fresh():
    """300 world clips of a seed the evaluator never saw: (videos, prompts, clips)."""
    return world.batch(FRESH_SEED, 0, 300)


@pytest.fixture(scope="module")
def cycled():
    """180 real videos cycling the 60 prompts (as evaluate_bundle draws them)."""
    prompts = [world.PROMPTS[i % 60] for i in range(180)]
    return metrics.real_videos(prompts, seed=FRESH_SEED), prompts


def test_shipped_evaluator_reads_fresh_clips(evaluator, fresh):
    videos, prompts, _ = fresh
    acc = evr.prompt_adherence(evaluator, videos, prompts)
    assert all(acc[k] >= 0.99 for k in ("colour", "shape", "direction")), acc
    report = evaluator.report
    assert report["heldout_accuracy"]["adherence"] >= 0.99 and report["heldout_seed"] != report["train_seed"]


def test_evaluator_takes_uint8_and_float_videos(evaluator, fresh):
    from flgengine.codec import uint8_to_video

    u8 = torch.from_numpy(fresh[0][:4])
    a, b = evaluator.features(u8), evaluator.features(uint8_to_video(u8))
    assert a.shape == (4, evaluator.config.feature_dim) and torch.equal(a, b)
    with pytest.raises(ValueError, match="9 frames of 32x32"):
        evaluator(u8[:, :5])


def test_real_videos_metrics(evaluator, cycled):
    videos, prompts = cycled
    r = metrics.evaluate_videos(videos, prompts, evaluator)
    assert r["videos"] == 180 and r["prompt_adherence"]["adherence"] >= 0.99
    m = r["motion"]
    assert abs(m["ratio"] - 1) < 0.05 and m["static_fraction"] == 0 and m["blank_frames"] == 0
    assert 0 <= r["fd_real_vs_real"] and r["fd"] < 3 * r["fd_real_vs_real"] + 1e-3


def test_centroids_follow_the_true_centre(fresh):
    videos, _, clips = fresh
    c = metrics.centroids(videos[:50])  # (50, T, 2)

    def area_centre(clip, t):  # a triangle's (apex up) centroid sits a third of its half-extent below the box centre
        x, y = clip.centre(t)
        return x, y + (clip.extent / 6 if clip.shape == "triangle" else 0)

    true = np.array([[area_centre(clip, t) for t in range(world.NUM_FRAMES)] for clip in clips[:50]])
    assert np.abs(c - true).max() < 0.3


def test_frozen_videos_are_static(fresh):
    videos = np.repeat(fresh[0][:60, :1], world.NUM_FRAMES, axis=1)  # first frame held
    m = metrics.motion(videos)
    assert m["ratio"] < 0.01 and m["static_fraction"] == 1


def test_blank_and_noise_frames():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 40, (4, world.NUM_FRAMES, 32, 32, 3), dtype=np.uint8)  # all below the threshold
    m = metrics.motion(noise)
    assert m["blank_frames"] == 1 and m["static_fraction"] == 1 and m["mean_speed"] == 0


def test_time_reversed_clips_fail_direction(evaluator):
    left = [p for p in world.PROMPTS if p.endswith("left")] * 4
    reversed_ = metrics.real_videos(left, seed=FRESH_SEED)[:, ::-1]  # they move right
    acc = evr.prompt_adherence(evaluator, reversed_, left)
    assert acc["direction"] < 0.05 and acc["colour"] >= 0.99 and acc["adherence"] < 0.05


def test_prompt_checks(evaluator, fresh):
    with pytest.raises(ValueError, match="does not name"):
        evr.prompt_adherence(evaluator, fresh[0][:1], ["a cat"])
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        evr.prompt_adherence(evaluator, fresh[0][:2], fresh[1][:1])
    with pytest.raises(ValueError, match="uint8 videos"):
        metrics.motion(fresh[0].astype(np.float32))


# ---- Fréchet distance -------------------------------------------------------------------

def test_frechet_identical_sets_is_zero():
    f = np.random.default_rng(0).normal(size=(500, 16))
    assert metrics.frechet_distance(f, f) == pytest.approx(0, abs=1e-6)


def test_frechet_closed_form_and_symmetry():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance_gaussians(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))  # a rotation of both keeps the distance
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert metrics.frechet_distance_gaussians(q @ mu1, s1, q @ mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert metrics.frechet_distance_gaussians(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)
    # from samples: converges to the closed form
    x = mu1 + np.sqrt(a) * rng.normal(size=(20000, 8))
    y = mu2 + np.sqrt(b) * rng.normal(size=(20000, 8))
    assert metrics.frechet_distance(x, y) == pytest.approx(expected, rel=0.05)
    assert metrics.frechet_distance(x, y) == pytest.approx(metrics.frechet_distance(y, x), rel=1e-6)


def test_frechet_separates_noise_from_real(evaluator, cycled):
    videos, prompts = cycled[0][:60], cycled[1][:60]
    noise = np.random.default_rng(0).integers(0, 256, videos.shape, dtype=np.uint8)
    r = metrics.evaluate_videos(noise, prompts, evaluator)
    assert r["fd"] > 20 * r["fd_real_vs_real"]
    assert r["prompt_adherence"]["adherence"] < 0.2


# ---- save / load -------------------------------------------------------------------------

@pytest.fixture
def evaluator_copy(tmp_path):
    return shutil.copytree(evr.DEFAULT_DIR, tmp_path / "evaluator")


def test_shipped_evaluator_is_small():
    assert sum(p.stat().st_size for p in evr.DEFAULT_DIR.iterdir()) < 1 << 20


def test_save_load_roundtrip(evaluator, tmp_path, fresh):
    evr.save_evaluator(evaluator, {"note": "copy"}, tmp_path)
    again = evr.load_evaluator(tmp_path)
    x = torch.from_numpy(fresh[0][:3])
    assert torch.equal(again.features(x), evaluator.features(x)) and again.report == {"note": "copy"}


def test_train_evaluator_smoke(tmp_path):
    config = evr.EvaluatorConfig(channels=(8, 8), feature_dim=8)
    model, report = evr.train_evaluator(steps=2, batch_size=8, heldout=20, config=config, progress=False)
    assert report["steps"] == 2 and set(report["heldout_accuracy"]) == {"adherence", "colour", "shape", "direction"}
    again = evr.load_evaluator(evr.save_evaluator(model, report, tmp_path))
    assert again.config == config and again.report["heldout_seed"] == evr.HELDOUT_SEED
    with pytest.raises(ValueError, match="another seed"):
        evr.train_evaluator(steps=1, seed=5, heldout_seed=5)


def test_load_missing_files(evaluator_copy, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        evr.load_evaluator(tmp_path / "nope")
    (evaluator_copy / "model.safetensors").unlink()
    with pytest.raises(BundleError, match=r"model\.safetensors: missing"):
        evr.load_evaluator(evaluator_copy)


def test_load_wrong_shapes_and_keys(evaluator_copy):
    from safetensors.torch import load_file, save_file

    weights = evaluator_copy / "model.safetensors"
    sd = load_file(weights)
    save_file({**sd, "heads.colour.weight": torch.zeros(7, 64)}, weights)
    with pytest.raises(BundleError, match=r"'heads\.colour\.weight' has shape \(7, 64\)"):
        evr.load_evaluator(evaluator_copy)
    save_file({k: v for k, v in sd.items() if k != "heads.shape.bias"}, weights)
    with pytest.raises(BundleError, match=r"missing tensor 'heads\.shape\.bias'"):
        evr.load_evaluator(evaluator_copy)


def test_load_bad_config(evaluator_copy):
    cfg_file = evaluator_copy / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "depth": 3}))
    with pytest.raises(BundleError, match="unknown key 'depth'"):
        evr.load_evaluator(evaluator_copy)
    cfg_file.write_text(json.dumps({**cfg, "colours": cfg["colours"][::-1]}))
    with pytest.raises(BundleError, match="colour labels .* differ from the world's"):
        evr.load_evaluator(evaluator_copy)


# ---- evaluate_bundle -------------------------------------------------------------------------

class FakePipeline:
    """Callable like a Pipeline; returns real world clips for the prompts it is given."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, *, seed, progress, steps=None, **kw):
        self.calls.append((list(prompts), seed, steps))
        return torch.from_numpy(metrics.real_videos(prompts, seed))


def test_evaluate_bundle_with_fake_pipeline(evaluator):
    pipe = FakePipeline()
    r = ev.evaluate_bundle(pipe, samples=62, seeds=(0, 3), batch_size=30, steps=4, progress=False, evaluator=evaluator)
    assert r["videos"] == 124 and r["samples"] == 62 and r["seeds"] == [0, 3] and r["steps"] == 4
    assert r["prompt_adherence"]["adherence"] >= 0.99 and abs(r["motion"]["ratio"] - 1) < 0.05
    assert r["seconds_per_video"] > 0
    assert [(len(p), s) for p, s, _ in pipe.calls] == [(30, 0), (30, 1), (2, 2), (30, 30000), (30, 30001), (2, 30002)]
    assert pipe.calls[2][0] == list(world.PROMPTS[:2])  # sample 60 + i cycles back to prompt i
    json.dumps(r)  # provenance-ready


def test_run_evaluate_writes_provenance(evaluator, tmp_path, monkeypatch, capsys):
    import argparse

    import flgengine

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "provenance.json").write_text(json.dumps({"kind": "student"}))
    monkeypatch.setattr(flgengine, "load", lambda model, **load_kwargs: FakePipeline())
    parser = argparse.ArgumentParser()
    ev.add_evaluate_args(parser)
    args = parser.parse_args([str(bundle), "--samples", "12", "--batch-size", "6", "--write-provenance"])
    assert ev.run_evaluate(args) == 0
    assert "adherence" in capsys.readouterr().out
    prov = json.loads((bundle / "provenance.json").read_text())
    assert prov["kind"] == "student" and prov["evaluation"]["videos"] == 12
    loads = []
    monkeypatch.setattr(flgengine, "load", lambda model, **kw: loads.append(kw) or FakePipeline())
    args = parser.parse_args([str(bundle), "--samples", "6", "--precision", "fp8", "--write-provenance"])
    assert ev.run_evaluate(args) == 0 and loads[-1]["precision"] == "fp8"
    prov = json.loads((bundle / "provenance.json").read_text())
    assert prov["evaluation"]["videos"] == 12 and prov["evaluation_fp8"]["precision"] == "fp8"
    threads = torch.get_num_threads()
    try:
        assert ev.run_evaluate(parser.parse_args([str(bundle), "--samples", "6", "--threads", "1"])) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="--threads must be at least 1, got 0"):
        ev.run_evaluate(parser.parse_args([str(bundle), "--threads", "0"]))


def test_first_frame_metrics_of_real_clips_and_of_broken_ones():
    """Image to video: real clips keep their first frames exactly; a clip whose frame 0 is another
    clip's, or whose shape grows, loses PSNR / size."""
    import numpy as np

    from distill.evaluate import world_first_frames
    from distill.metrics import first_frame_metrics
    from distill.worlds import shapes as world

    prompts = [world.PROMPTS[i] for i in range(6)]
    rng = np.random.default_rng([3, 7])
    from distill.evaluator import parse_prompts

    clips = [world.sample_clip(rng, colour=c, shape=s, direction=d) for c, s, d in parse_prompts(prompts)]
    videos = np.stack([world.render(c) for c in clips])  # (6, T, H, W, 3)
    first = world_first_frames(prompts, 3).numpy()
    assert np.array_equal(first, videos[:, 0])  # the same draws: world_first_frames is frame 0 of these clips
    read = {"colour": [p[0] for p in parse_prompts(prompts)], "shape": [p[1] for p in parse_prompts(prompts)]}
    m = first_frame_metrics(videos, first, read, prompts)
    assert m["frame0_psnr"] == 100.0 and m["appearance_kept"] == 1.0 and m["size_kept"] == 1.0
    shifted = first_frame_metrics(videos, np.roll(first, 1, axis=0), read, prompts)
    assert shifted["frame0_psnr"] < 30
    grown = videos.copy()
    grown[:, -1] = np.maximum(grown[:, -1], np.roll(grown[:, -1], 6, axis=2))  # last frame: the shape doubled
    assert first_frame_metrics(grown, first, read, prompts)["size_kept"] < 1.0
    read["colour"][0] = "nothing"
    assert first_frame_metrics(videos, first, read, prompts)["appearance_kept"] == 5 / 6
