"""The shapes world obeys its spec; its text encoder; teacher training resumes exactly."""

import numpy as np
import pytest
import torch

from flgengine.text import TokenTextEncoder
from distill.worlds import shapes


def _centroid(frame: np.ndarray) -> tuple[float, float]:
    w = frame.astype(np.float64).max(axis=-1)  # (H, W) coverage x colour intensity
    ys, xs = np.mgrid[: w.shape[0], : w.shape[1]]
    return (w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()


def test_prompts_and_vocabulary():
    assert len(shapes.PROMPTS) == 60 == len(set(shapes.PROMPTS))
    assert shapes.PROMPTS[0] == "a red circle moving left"
    assert shapes.parse_prompt("A Yellow Triangle moving UP") == ("yellow", "triangle", "up")
    assert shapes.parse_prompt("a red blue circle moving left") is None


def test_stream_is_deterministic_per_seed():
    a, b, c = shapes.stream(3), shapes.stream(3), shapes.stream(4)
    for _ in range(3):
        (va, pa), (vb, pb), (vc, _) = next(a), next(b), next(c)
        assert np.array_equal(va, vb) and pa == pb
    assert not np.array_equal(va, vc)
    v1, p1, _ = shapes.batch(7, 5, 4)
    v2, p2, _ = shapes.batch(7, 5, 4)
    assert np.array_equal(v1, v2) and p1 == p2 and not np.array_equal(v1, shapes.batch(7, 6, 4)[0])


def test_clips_obey_the_spec():
    videos, prompts, clips = shapes.batch(11, 0, 200)
    assert videos.shape == (200, 9, 32, 32, 3) and videos.dtype == np.uint8
    seen = set()
    for v, p, clip in zip(videos, prompts, clips):
        colour, shape, direction = shapes.parse_prompt(p)
        seen.add((colour, shape, direction))
        assert 0.25 * 32 <= clip.extent <= 0.40 * 32
        rgb = np.array(shapes.COLOURS[colour])
        dx, dy = shapes.DIRECTIONS[direction]
        centres = [_centroid(f) for f in v]
        steps = np.diff(np.array(centres), axis=0)  # (T-1, 2) pixels per frame
        # constant speed of 1/30 of the side along the named direction, none across it
        # (4x4 supersampling quantises each frame's centroid by up to ~0.1 px)
        along, across = steps @ np.array([dx, dy]), steps @ np.array([dy, dx])
        np.testing.assert_allclose(along.mean(), 32 / 30, atol=0.03)
        np.testing.assert_allclose(along, 32 / 30, atol=0.3)
        np.testing.assert_allclose(across, 0.0, atol=0.3)
        assert abs(across.mean()) < 0.03
        for f in v:
            lit = f.max(axis=-1) > 0
            # wholly inside: nothing lit touches a border row or column unless it is the shape's own edge
            assert lit.any() and not (lit[0].all() or lit[-1].all() or lit[:, 0].all() or lit[:, -1].all())
            # one colour on black: every lit pixel is a multiple of the colour (anti-aliased edge)
            px = f[lit].astype(np.float64)
            alpha = px.max(axis=1, keepdims=True) / rgb.max()
            np.testing.assert_allclose(px, alpha * rgb, atol=2.0)
        # the full shape area: a square covers extent^2, a circle pi/4 of it, a triangle half
        area = v[0].max(axis=-1).astype(np.float64).sum() / rgb.max()
        expect = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[shape] * clip.extent**2
        assert abs(area - expect) < 0.08 * expect + 1.5
    assert len(seen) > 50  # attributes are drawn uniformly: most of the 60 combinations appear


def test_shapes_stay_inside_every_frame_at_the_extremes():
    rng = np.random.default_rng(0)
    for _ in range(300):
        clip = shapes.sample_clip(rng)
        h = clip.extent / 2
        for f in range(shapes.NUM_FRAMES):
            cx, cy = clip.centre(f)
            assert h <= cx <= 32 - h and h <= cy <= 32 - h


def test_frame_counts():
    with pytest.raises(ValueError, match="4k\\+1"):
        next(shapes.stream(0, num_frames=8))
    v, _, _ = shapes.batch(0, 0, 1, num_frames=17)
    assert v.shape[1] == 17


def test_token_text_encoder_accepts_any_string_and_round_trips(tmp_path):
    enc = TokenTextEncoder(list(shapes.VOCAB), max_length=8, dim=16)
    ids = enc.tokenize(["a red circle moving left", "", "Hello, RED!!! circle?", "w " * 20])
    assert ids[0, :5].tolist() == [enc.ids[w] for w in "a red circle moving left".split()] and ids[0, 5:].eq(0).all()
    assert ids[1].eq(0).all()
    assert ids[2, :3].tolist() == [1, enc.ids["red"], enc.ids["circle"]]  # unknown -> <unk>, punctuation dropped
    assert ids[3].eq(1).all()  # truncated to max_length
    emb = enc.encode(["a red circle moving left", ""])
    assert emb.shape == (2, 8, 16) and emb[1].abs().sum() == 0 and emb[0, 5:].abs().sum() == 0
    enc.save(tmp_path / "te")
    again = TokenTextEncoder.load(tmp_path / "te")
    assert torch.equal(again.encode(["a blue square"]), enc.encode(["a blue square"]))


def test_token_text_encoder_words_see_the_whole_prompt():
    # the word mixer makes every word's state depend on every other word: changing the last
    # word (the direction) changes the state of the first word, which a DiT may attend to
    torch.manual_seed(0)
    enc = TokenTextEncoder(list(shapes.VOCAB), max_length=8, dim=16, layers=1)
    a, b = enc(["a red circle moving left", "a red circle moving up"])
    assert (a[0] - b[0]).abs().max() > 1e-3
    # without it, words are independent: only the changed position differs
    flat = TokenTextEncoder(list(shapes.VOCAB), max_length=8, dim=16, layers=0)
    a, b = flat(["a red circle moving left", "a red circle moving up"])
    assert torch.equal(a[:4], b[:4]) and not torch.equal(a[4], b[4])
    # an all-padding prompt (the CFG unconditional input) stays finite, exactly zero, with finite gradients
    out = enc(["", "a blue square"])
    assert out[0].abs().sum() == 0
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


def test_teacher_zero_init_starts_as_identity_branches():
    from distill.teacher import TeacherConfig, _build
    from flgengine.model.dit import velocity_skip

    cfg = TeacherConfig(num_layers=2, ffn_dim=64, num_heads=2, head_dim=16, text_dim=16, freq_dim=16)
    model, text = _build(cfg)
    x = torch.randn(2, 3, 5, 32, 32)
    t = torch.tensor([100.0, 900.0])
    v = model(x, t, text(["a red circle moving left", ""]))
    # zeroed output projection: the network adds nothing to the velocity skip c_skip(t) * x
    skip = velocity_skip(t, cfg.velocity_skip).view(2, 1, 1, 1, 1) * x
    assert v.shape == x.shape and (v - skip).abs().max() < 1e-6
    # with x0 prediction (the v9 recipe) the network's x0 estimate starts at 0, so v = x_t / t
    x0cfg = TeacherConfig(**{**vars(cfg), "velocity_skip": None, "x0_prediction": 0.05})
    m0, t0 = _build(x0cfg)
    v0 = m0(x, t, t0(["a red circle moving left", ""]))
    assert (v0 - x / torch.tensor([0.1, 0.9]).view(2, 1, 1, 1, 1)).abs().max() < 1e-5
    D = model.config.dim
    gates = torch.cat([model.time_proj.weight[2 * D:3 * D], model.time_proj.weight[5 * D:6 * D]])
    assert gates.abs().max() == 0 and all(b.modulation[[2, 5]].abs().max() == 0 for b in model.blocks)
    fresh, _ = _build(TeacherConfig(**{**vars(cfg), "zero_init": False}))
    assert fresh(x, torch.tensor([100.0, 900.0]), text(["", ""])).abs().max() > 0


def test_teacher_position_embeddings_stand_out_of_high_noise_tokens():
    # at t ~ 1 a token's patch embedding is noise; the position table must be of comparable
    # size or the network cannot tell where a token is (see TeacherConfig.pos_init_std)
    from distill.teacher import TeacherConfig, _build

    small = dict(num_layers=2, ffn_dim=64, num_heads=2, head_dim=16, text_dim=16, freq_dim=16)
    model, _ = _build(TeacherConfig(**small))
    noise = model.patch_embed(torch.randn(64, 3, 1, 8, 8)).flatten()
    assert abs(model.pos_table.std().item() - 1.0) < 0.05
    assert model.pos_table.std() > noise.std()
    model, _ = _build(TeacherConfig(**small, pos_init_std=0.02))
    assert abs(model.pos_table.std().item() - 0.02) < 0.002
    model, _ = _build(TeacherConfig(**small, pos_table=False))
    assert all(abs(getattr(model, n).std().item() - 1.0) < 0.05 for n in ("pos_frame", "pos_row", "pos_col"))


def test_teacher_cli_boolean_flags():
    import argparse

    from distill.teacher import add_args, config_from_args

    p = argparse.ArgumentParser()
    add_args(p)
    cfg = config_from_args(p.parse_args(["--out", "x", "--no-zero-init", "--compile", "--patch", "4"]))
    assert cfg.zero_init is False and cfg.compile is True and cfg.patch == 4
    assert config_from_args(p.parse_args(["--out", "x"])).zero_init is True
    # optional numbers take "none"; the low-noise expert's options parse
    cfg = config_from_args(p.parse_args(["--out", "x", "--velocity-skip", "none", "--x0-prediction", "0.05",
                                         "--t-max", "0.35", "--boundary", "0.2"]))
    assert cfg.velocity_skip is None and cfg.x0_prediction == 0.05 and cfg.t_max == 0.35 and cfg.boundary == 0.2


def test_teacher_training_resumes_to_the_same_weights(tmp_path):
    from distill.teacher import TeacherConfig, train_teacher
    from flgengine.bundle import load_bundle

    cfg = dict(steps=4, batch_size=2, num_layers=2, ffn_dim=64, num_heads=2, head_dim=16, text_dim=16,
               freq_dim=16, checkpoint_every=2, compile=False, warmup=1)
    straight = train_teacher(TeacherConfig(**cfg), tmp_path / "a", progress=False)
    # the same run stopped after its step-2 checkpoint, then resumed
    partial = TeacherConfig(**{**cfg, "steps": 4})
    from distill.trainer import Trainer

    class Stop(Exception):
        pass

    orig = Trainer.save

    def save_then_stop(self):
        orig(self)
        if self.step == 2:
            raise Stop

    Trainer.save = save_then_stop
    try:
        with pytest.raises(Stop):
            train_teacher(partial, tmp_path / "b", progress=False)
    finally:
        Trainer.save = orig
    resumed = train_teacher(partial, tmp_path / "b", progress=False)
    assert resumed["steps"] == straight["steps"] == 4
    a, b = load_bundle(straight["bundle"]).model.state_dict(), load_bundle(resumed["bundle"]).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "bundle" / "text_encoder" / "model.safetensors").is_file()
