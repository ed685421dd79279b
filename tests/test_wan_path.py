"""The Wan path end to end on tiny random Wan components: a diffusers pipeline directory
-> precompute -> importance -> plan -> stage2 -> stage3 -> bundle -> generate() -> to_diffusers."""

import json

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

import flgengine  # noqa: E402
from distill.data import ShardData  # noqa: E402
from distill.wan import find_clips, precompute  # noqa: E402
from flgengine.convert import bundle_from_diffusers, to_diffusers  # noqa: E402
from flgengine.config import ModelConfig  # noqa: E402
from flgengine.model import DiT  # noqa: E402
from tiny_wan import make_tiny_umt5, make_tiny_wan_vae  # noqa: E402
from helpers import assert_close, tiny_shard_run, write_clips  # noqa: E402

SIZE = dict(num_frames=9, height=64, width=64, steps=4, max_length=24)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    """A diffusers-layout Wan pipeline of tiny random parts."""
    d = tmp_path_factory.mktemp("wan")
    make_tiny_umt5(d, d_model=32, max_length=24)
    make_tiny_wan_vae(d, z_dim=4)
    torch.manual_seed(0)
    dit = DiT(ModelConfig(in_channels=4, out_channels=4, patch_size=(1, 2, 2), num_heads=2, head_dim=16, ffn_dim=64,
                          text_dim=32, freq_dim=32, num_layers=4))
    to_diffusers(dit, d / "transformer")
    (d / "scheduler").mkdir()
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps({"flow_shift": 3.0}))
    (d / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return d


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    # squares drifting right over 48x48 frames, resized to 64x64 by precompute
    return write_clips(tmp_path_factory.mktemp("videos"), ["a red square moving right"] * 5, 10, 48, 48, 16, 2)


def test_convert_and_precompute(wan_dir, videos, tmp_path):
    bundle = bundle_from_diffusers(wan_dir, tmp_path / "teacher", **SIZE)
    pipe = flgengine.load(bundle)
    assert pipe.config.sampler.shift == 3.0 and pipe.config.num_frames == 9
    paths = precompute(bundle, videos, tmp_path / "shards", shard_size=2, batch_size=2, progress=False)
    assert len(paths) == 3  # 5 clips in shards of 2
    data = ShardData(tmp_path / "shards")
    assert len(data) == 5 and data.latents.shape == (5, 4, 3, 8, 8) and data.context.shape == (5, 24, 32)
    assert torch.equal(data.uncond, pipe.text_encoder.encode([""], dtype=torch.float32))
    x0, c = data.batch(3, 4)
    assert x0.shape == (4, 4, 3, 8, 8) and torch.equal(data.batch(3, 4)[0], x0)
    # the latents are the VAE's encoding of the resized clip
    from distill.wan import read_video

    video = read_video(sorted(videos.glob("*.gif"))[0], 9, 64, 64)
    assert_close(data.latents[0], pipe.codec.encode(video[None]).float()[0], 1e-5, "latents")
    (videos / "clip9.gif").write_bytes((videos / "clip0.gif").read_bytes())
    try:
        with pytest.raises(FileNotFoundError, match="clip9.txt: missing"):
            find_clips(videos)
    finally:
        (videos / "clip9.gif").unlink()


def test_wan_teacher_to_student_to_diffusers(wan_dir, videos, tmp_path):
    bundle = bundle_from_diffusers(wan_dir, tmp_path / "teacher", **SIZE)
    precompute(bundle, videos, tmp_path / "shards", progress=False)
    result = tiny_shard_run(wan_dir, tmp_path / "run", tmp_path / "shards", convert=SIZE)
    student = flgengine.load(result["bundle"])
    assert student.config.distilled and len(student.dit.blocks) < 4
    video = flgengine.generate("a red square moving right", model=result["bundle"], seed=0, progress=False)
    assert video.shape == (1, 9, 64, 64, 3)
    # the student loads in diffusers and computes the same function
    wan = WanTransformer3DModel.from_pretrained(to_diffusers(result["bundle"], tmp_path / "diffusers")).eval()
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(1, 4, 3, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 24, 32, generator=g)
    with torch.no_grad():
        assert_close(wan(x, t, c, return_dict=False)[0], student.dit(x, t, c), 1e-5, "student in diffusers")


# ---- image to video: the first frame of every clip is its image ---------------------------------

I2V_SIZE = dict(num_frames=5, height=32, width=48, steps=4, guidance=3.0)


@pytest.fixture(scope="module", params=["concat", "first_frame"])
def i2v_dir(request, tmp_path_factory):
    """A diffusers WanImageToVideoPipeline directory of tiny random parts: Wan2.1-I2V (concat,
    CLIP tokens) or Wan2.2-TI2V (first_frame)."""
    from tiny_wan import make_tiny_wan_i2v_pipeline

    return make_tiny_wan_i2v_pipeline(tmp_path_factory.mktemp(request.param) / "wan", request.param, num_layers=4)


def _i2v_convert(i2v_dir):
    max_length = 512 if (i2v_dir / "image_encoder").is_dir() else 24  # diffusers' Wan2.1-I2V pads text to 512
    return {**I2V_SIZE, "max_length": max_length}


def test_precompute_stores_the_first_frame_as_the_teachers_image(i2v_dir, videos, tmp_path):
    from distill.data import shard_data
    from distill.wan import read_video
    from flgengine.bundle import BundleError
    from flgengine.conditioning import image_condition

    bundle = bundle_from_diffusers(i2v_dir, tmp_path / "teacher", **_i2v_convert(i2v_dir))
    pipe = flgengine.load(bundle)
    kind, clip = pipe.config.image, pipe.image_encoder is not None
    precompute(bundle, videos, tmp_path / "shards", shard_size=2, batch_size=2, progress=False)
    data = shard_data(pipe, tmp_path / "shards")
    assert data.image_latents.shape == ((5, 4, 1, 4, 6) if kind == "first_frame" else (5, 4, 2, 4, 6))
    assert (data.image_context is not None) == clip
    # a batch's condition is the one generate() builds from those clips' first frames
    step, n = 3, 4
    x0, _ = data.batch(step, n)
    got = data.condition(x0, step)
    clips = sorted(videos.glob("*.gif"))
    idx = data._rows(step, n)
    frames = torch.stack([read_video(clips[i], 5, 32, 48)[:, 0] for i in idx])  # (n, 3, H, W)
    tokens = None
    if clip:
        pixels = ((frames + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        tokens = pipe.image_encoder.encode(list(pixels)).float()
    want = image_condition(kind, frames, pipe.codec, 5, (1, 2, 2), "cpu", torch.float32, tokens)
    assert_close(got.latents, want.latents, 1e-5, "image latents")
    if clip:
        assert_close(got.image_context, want.image_context, 1e-5, "image tokens")
    if kind == "first_frame":  # a causal VAE: the clip's first latent frame is its first frame's latent
        assert_close(got.latents, x0[:, :, :1], 1e-4, "first latent frame")
    # shards and teacher must agree on the scheme
    text_shards = tmp_path / "text-shards"
    text_shards.mkdir()
    from safetensors.torch import save_file

    save_file({"latents": data.latents, "context": data.context}, text_shards / "shard-0.safetensors")
    with pytest.raises(BundleError, match="no image_latents; precompute them"):
        shard_data(pipe, text_shards)
    with pytest.raises(BundleError, match="teacher is text-to-video"):
        ShardData(tmp_path / "shards")


def test_wan_i2v_teacher_to_student_to_diffusers(i2v_dir, videos, tmp_path):
    """convert -> precompute -> Stages I-III -> bundle -> generate(image=) -> to_diffusers."""
    convert = _i2v_convert(i2v_dir)
    bundle = bundle_from_diffusers(i2v_dir, tmp_path / "teacher", **convert)
    precompute(bundle, videos, tmp_path / "shards", progress=False)
    result = tiny_shard_run(i2v_dir, tmp_path / "run", tmp_path / "shards", convert=convert)
    student = flgengine.load(result["bundle"])
    kind = student.config.image
    assert student.config.distilled and kind == flgengine.load(bundle).config.image and len(student.dit.blocks) < 4
    picture = torch.randint(0, 256, (32, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    video = flgengine.generate("a red square moving right", model=result["bundle"], image=picture, seed=0,
                               progress=False)
    assert video.shape == (1, 5, 32, 48, 3)
    # the student loads in diffusers and computes the same function, image inputs included
    wan = WanTransformer3DModel.from_pretrained(to_diffusers(result["bundle"], tmp_path / "diffusers")).eval()
    g = torch.Generator().manual_seed(0)
    C = student.dit.config.in_channels
    x, t = torch.randn(1, C, 2, 4, 6, generator=g), torch.tensor([500.0])
    c = torch.randn(1, convert["max_length"], 32, generator=g)
    kw = {}
    if student.dit.config.image_dim is not None:
        kw = {"image_context": torch.randn(1, 17, student.dit.config.image_dim, generator=g)}
    with torch.no_grad():
        want = student.dit(x, t, c, **kw)
        got = wan(x, t, c, encoder_hidden_states_image=kw.get("image_context"), return_dict=False)[0]
    assert_close(got, want, 1e-5, f"{kind} student in diffusers")
