"""Image to video: image inputs (reading, checks, fitting), and both Wan schemes end to end
against diffusers' WanImageToVideoPipeline on tiny random Wan parts (umT5, Wan VAE, CLIP vision)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import flgengine
from flgengine.bundle import BundleError
from flgengine.image import fit_image, read_image, read_images

# ---- image inputs ---------------------------------------------------------------------------


def test_images_of_every_kind_read_as_the_same_pixels(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (6, 9, 3), dtype=torch.uint8, generator=g)
    Image.fromarray(pixels.numpy()).save(tmp_path / "a.png")
    Image.fromarray(np.concatenate([pixels.numpy(), np.full((6, 9, 1), 255, np.uint8)], -1), "RGBA").save(tmp_path / "b.png")
    for image in (pixels, pixels.numpy(), Image.fromarray(pixels.numpy()), tmp_path / "a.png", str(tmp_path / "b.png"),
                  pixels.permute(2, 0, 1).float() / 255):
        got = read_image(image)
        assert got.dtype == torch.uint8 and torch.equal(got, pixels), type(image)


@pytest.mark.parametrize("image,match", [
    ("missing.png", "image 'missing.png': no such file"),
    (np.zeros((4, 4, 3), np.float32), "a numpy image must be uint8"),
    (torch.zeros(4, 4, 4, dtype=torch.uint8), "a uint8 image must be \\(H, W, 3\\) RGB, got shape \\(4, 4, 4\\)"),
    (torch.zeros(3, 4, 4, dtype=torch.uint8), "a uint8 image must be \\(H, W, 3\\)"),
    (torch.zeros(4, 4, 3), "a float image must be \\(3, H, W\\)"),
    (torch.full((3, 4, 4), 2.0), "finite values in \\[0, 1\\], got \\[2, 2\\]"),
    (torch.zeros(0, 5, 3, dtype=torch.uint8), "image is empty \\(0x5 pixels\\)"),
    (torch.zeros(4, 4, 3, dtype=torch.int32), "dtype torch.int32 is neither"),
    (17, "must be a path, a PIL image"),
])
def test_bad_images_are_one_clear_error(image, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=match):
        read_image(image)


def test_an_unreadable_file_and_a_wrong_count_are_clear_errors(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="x.png.: not an image Pillow can read"):
        read_image(tmp_path / "x.png")
    img = torch.zeros(4, 4, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="got 2 images for 3 prompts"):
        read_images([img, img], 3)
    assert len(read_images(img, 3)) == 3


def test_fit_scales_to_cover_and_crops_the_centre():
    # a 4:3 image for a 16:9 frame: scaled to the frame's width, its top and bottom bands cut
    image = torch.zeros(60, 80, 3, dtype=torch.uint8)
    image[:, :, 1] = 255  # green ...
    image[:12, :, 0], image[:12, :, 1] = 255, 0  # ... with a red band of 12 rows at the top
    frame = fit_image(image, 36, 64)  # 80 -> 64 wide (x 0.8): 48 high, 6 rows cut at top and bottom
    assert frame.shape == (3, 36, 64)
    # the band is 9.6 rows once scaled: 6 are cut, the frame's top row is red, its lower part green
    assert frame[0, 0].min() > 0.9 and frame[1, 0].max() < -0.9
    assert frame[1, 6:].min() > 0.99 and frame[0, 6:].max() < -0.99
    # the frame's own size: the pixels themselves, scaled to [-1, 1]
    g = torch.Generator().manual_seed(1)
    exact = torch.randint(0, 256, (36, 64, 3), dtype=torch.uint8, generator=g)
    assert torch.allclose(fit_image(exact, 36, 64), exact.permute(2, 0, 1).float() / 127.5 - 1, atol=1e-6)


# ---- the two Wan schemes against diffusers ---------------------------------------------------

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["first_frame", "concat_clip", "concat"])
def bundle(request, tmp_path_factory):
    from tiny_wan import make_tiny_wan_i2v_bundle

    image = "concat" if request.param.startswith("concat") else "first_frame"
    return make_tiny_wan_i2v_bundle(tmp_path_factory.mktemp(request.param), image,
                                    clip=request.param == "concat_clip")


def _picture(h=32, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g)


def _diffusers_pipeline(bundle):
    """diffusers' WanImageToVideoPipeline on the bundle's parts, with a flow-matching Euler
    scheduler on our sigmas (the bundle's sampler)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    from flgengine.convert import to_diffusers
    from flgengine.sampling import euler_sigmas

    cfg = json.loads((bundle / "pipeline.json").read_text())
    sigmas = euler_sigmas(cfg["sampler"]["num_steps"], cfg["sampler"]["shift"])[:-1].tolist()

    class OurSigmas(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kw):
            super().set_timesteps(sigmas=sigmas, device=device)

    from diffusers import WanTransformer3DModel

    dit = flgengine.load(bundle, device="cpu").dit
    transformer = WanTransformer3DModel.from_pretrained(to_diffusers(dit, bundle.parent / f"{bundle.name}-dit")).eval()
    parts = {}
    if cfg["image_encoder"]["kind"] == "clip":
        from transformers import CLIPImageProcessor, CLIPVisionModel

        parts = {"image_encoder": CLIPVisionModel.from_pretrained(bundle / "image_encoder").eval(),
                 "image_processor": CLIPImageProcessor.from_pretrained(bundle / "image_processor")}
    return WanImageToVideoPipeline(
        tokenizer=AutoTokenizer.from_pretrained(bundle / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(bundle / "text_encoder").eval(),
        vae=AutoencoderKLWan.from_pretrained(bundle / "vae").eval(), scheduler=OurSigmas(shift=1.0),
        transformer=transformer, expand_timesteps=cfg["image"] == "first_frame", **parts)


def test_generate_matches_diffusers_image_to_video_pipeline(bundle):
    from PIL import Image

    from helpers import assert_close, capture_latents

    pipe = flgengine.load(bundle, device="cpu")
    seen = capture_latents(pipe)
    picture = _picture()
    ours = pipe("a red cat runs", image=picture, seed=3, progress=False)  # (1, 5, 32, 48, 3) uint8
    ref_pipe = _diffusers_pipeline(bundle)
    noise = torch.randn((1, 4, 2, 4, 6), generator=torch.Generator().manual_seed(3))  # as generate() draws it
    kw = dict(image=Image.fromarray(picture.numpy()), prompt="a red cat runs", negative_prompt="", height=32, width=48,
              num_frames=5, num_inference_steps=4, guidance_scale=3.0, max_sequence_length=pipe.text_encoder.max_length)
    with torch.no_grad():
        ref_latents = ref_pipe(**kw, latents=noise, output_type="latent").frames
        ref = ref_pipe(**kw, latents=noise, output_type="pt").frames  # (1, T, 3, H, W) in [0, 1]
    assert_close(seen["latents"], ref_latents, 1e-5, "sampled latents")
    ref = (ref.permute(0, 1, 3, 4, 2) * 255).round()
    assert ours.shape == ref.shape == (1, 5, 32, 48, 3)
    diff = (ours.float() - ref).abs()
    assert diff.max() <= 1 and diff.mean() < 0.02, (diff.max(), diff.mean())  # uint8 rounding of equal videos


def test_another_image_gives_another_video(bundle):
    pipe = flgengine.load(bundle, device="cpu")
    a = pipe("a red cat runs", image=_picture(seed=0), seed=1, progress=False)
    b = pipe("a red cat runs", image=_picture(seed=1), seed=1, progress=False)
    assert (a.float() - b.float()).abs().mean() > 0.05  # (random tiny DiTs: concat without CLIP moves least)
    # one image per prompt, or one for all
    both = pipe(["a red cat runs", "a dog"], image=[_picture(seed=0), _picture(seed=1)], seed=1, progress=False)
    assert both.shape[0] == 2


def test_first_frame_keeps_the_image_latent_and_gives_its_tokens_timestep_0():
    """first_frame: latent frame 0 is the image's latent, exactly, whatever the DiT does; the
    DiT sees it there with timestep 0 on its tokens and t elsewhere."""
    from flgengine.codec import PixelCodec
    from flgengine.conditioning import image_condition

    frames = fit_image(_picture(8, 6), 8, 6)[None]  # (1, 3, 8, 6)
    cond = image_condition("first_frame", frames, PixelCodec(), 3, (1, 2, 2), "cpu", torch.float32)
    seen = {}

    def dit(x, t, context):
        seen.update(x=x, t=t)
        return torch.zeros_like(x)

    x = torch.randn(2, 3, 3, 8, 6)  # CFG doubles the batch
    cond.model(dit)(x, torch.tensor([700.0, 700.0]), None)
    assert torch.equal(seen["x"][:, :, 0], frames.expand(2, -1, -1, -1)) and torch.equal(seen["x"][:, :, 1:], x[:, :, 1:])
    S0 = 4 * 3  # tokens of one latent frame (8 x 6, patch 2 x 2)
    assert seen["t"].shape == (2, 3 * S0) and (seen["t"][:, :S0] == 0).all() and (seen["t"][:, S0:] == 700).all()
    assert torch.equal(cond.finish(x[:1])[:, :, 0], frames)


def test_image_errors_before_compute(bundle, tmp_path):
    pipe = flgengine.load(bundle, device="cpu")
    calls = []
    forward = pipe.dit.forward
    pipe.dit.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    with pytest.raises(ValueError, match="is image-to-video .* pass image="):
        pipe("a cat", progress=False)
    with pytest.raises(ValueError, match="no such file"):
        pipe("a cat", image=tmp_path / "nope.png", progress=False)
    with pytest.raises(ValueError, match="got 3 images for 1 prompt"):
        pipe("a cat", image=[_picture()] * 3, progress=False)
    assert not calls


def test_text_to_video_models_refuse_an_image():
    with pytest.raises(ValueError, match="is text-to-video .* it takes no image"):
        flgengine.generate("a red circle moving left", image=_picture(), progress=False)


def test_a_bundle_whose_parts_do_not_fit_its_scheme_is_refused(bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    cfg = json.loads((copy / "pipeline.json").read_text())
    if cfg["image_encoder"]["kind"] == "clip":
        shutil.rmtree(copy / "image_encoder")
        with pytest.raises(BundleError, match="image_encoder: image encoder directory not found"):
            flgengine.load(copy, device="cpu")
        return
    cfg["image"] = "first_frame" if cfg["image"] == "concat" else "concat"
    (copy / "pipeline.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="needs a DiT of .* input channels"):
        flgengine.load(copy, device="cpu")


def test_cli_image(bundle, tmp_path):
    from flgengine.__main__ import main
    from PIL import Image

    Image.fromarray(_picture().numpy()).save(tmp_path / "first.png")
    out = tmp_path / "v.gif"
    assert main(["generate", "a red cat runs", "--model", str(bundle), "--image", str(tmp_path / "first.png"),
                 "-o", str(out), "--quiet"]) == 0
    assert out.is_file()


# ---- engines ------------------------------------------------------------------------------------

def _engine_gives_the_pytorch_video(bundle, fmt, tmp_path):
    """The engine takes what the DiT takes: t per token (first_frame), CLIP image tokens
    (an image_context input) for a DiT with image_dim, the extra input channels (concat)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from flgengine.export import export_engine

    manifest = export_engine(bundle, fmt, tmp_path / fmt, progress=False)
    names = [s.name for s in manifest.inputs]
    pipe = flgengine.load(bundle, device="cpu")
    c = pipe.dit.config
    assert names == ["x", "t", "context"] + (["image_context"] if c.image_dim else [])
    assert manifest.input("x").shape[1] == c.in_channels
    assert manifest.input("t").shape == (("batch", 12) if pipe.config.image == "first_frame" else ("batch",))
    if c.image_dim:
        assert manifest.input("image_context").shape == ("batch", 17, 16)  # (32 / 8)^2 + 1 CLIP tokens
    kw = dict(image=_picture(), seed=2, progress=False)
    want = pipe("a red cat runs", **kw)
    got = flgengine.load(bundle, engine=tmp_path / fmt)("a red cat runs", **kw)
    assert (got.float() - want.float()).abs().max() <= 1  # fp32 engines: the same video up to uint8 rounding


def test_image_to_video_onnx_engines_give_the_pytorch_video(bundle, tmp_path):
    _engine_gives_the_pytorch_video(bundle, "onnx", tmp_path)


@pytest.mark.parametrize("image", ["first_frame", "concat"])
def test_image_to_video_aoti_engines_give_the_pytorch_video(image, tmp_path):
    """(AOTInductor compiles take ~15 s here: the two schemes with new inputs, per-token t and
    CLIP image tokens)"""
    from tiny_wan import make_tiny_wan_i2v_bundle

    _engine_gives_the_pytorch_video(make_tiny_wan_i2v_bundle(tmp_path / "b", image, clip=True), "aoti", tmp_path)


# ---- conversion ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_a_diffusers_image_to_video_pipeline_converts_to_a_bundle(kind, tmp_path):
    """bundle_from_diffusers reads the scheme off the pipeline: concat (+ CLIP parts) for a
    transformer with extra input channels, first_frame when model_index.json sets expand_timesteps."""
    from flgengine.convert import bundle_from_diffusers
    from tiny_wan import make_tiny_wan_i2v_bundle, make_tiny_wan_i2v_pipeline

    image = "concat" if kind == "i2v" else "first_frame"
    src = make_tiny_wan_i2v_bundle(tmp_path / "src", image)
    wan = make_tiny_wan_i2v_pipeline(tmp_path / "wan", image)
    bundle = bundle_from_diffusers(wan, tmp_path / "bundle", num_frames=5, height=32, width=48, steps=4, guidance=3.0,
                                   max_length=512 if kind == "i2v" else 24)
    cfg = json.loads((bundle / "pipeline.json").read_text())
    assert cfg["image"] == ("concat" if kind == "i2v" else "first_frame")
    assert cfg["image_encoder"]["kind"] == ("clip" if kind == "i2v" else "none")
    kw = dict(image=_picture(), seed=4, progress=False)
    want = flgengine.load(src, device="cpu")("a red cat runs", **kw)
    got = flgengine.load(bundle, device="cpu")("a red cat runs", **kw)
    assert torch.equal(got, want)  # the same parts and sampler: the same video
