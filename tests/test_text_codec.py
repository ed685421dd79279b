"""Text encoders and codecs against diffusers' Wan pipelines, on tiny random models."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from flgengine.codec import PixelCodec, WanVAECodec, build_codec, uint8_to_video, video_to_uint8  # noqa: E402
from flgengine.config import CodecConfig, TextEncoderConfig  # noqa: E402
from tiny_wan import make_tiny_umt5, make_tiny_wan_vae  # noqa: E402
from flgengine.text import UMT5TextEncoder, build_text_encoder, clean_prompt  # noqa: E402

MAX_LEN = 16

PROMPT_BATCHES = {
    "two_lengths": ["a red cat runs", "the big blue dog slowly walks through the dark forest near the river"],
    "truncated": [" ".join(["the small bird flies over the sea"] * 5)],
    "empty": [""],
    "unknown_words": ["Zebras &amp;amp; gnus <b>gallop</b>   across\tthe  savanna!!"],
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_tiny_umt5(root, max_length=MAX_LEN)
    make_tiny_wan_vae(root)
    return root


@pytest.fixture(scope="module")
def umt5(root):
    return build_text_encoder(TextEncoderConfig(kind="umt5", path="text_encoder", max_length=MAX_LEN), root)


@pytest.fixture(scope="module")
def wan_pipe(root):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    return WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(root / "text_encoder").eval(),
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


@pytest.fixture(scope="module")
def wan_vae(root):
    return build_codec(CodecConfig(kind="wan_vae", path="vae"), root)


def _video(b, t, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1  # (B, 3, T, H, W) in [-1, 1]


# -- text ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PROMPT_BATCHES))
def test_umt5_matches_wan_pipeline(umt5, wan_pipe, name):
    prompts = PROMPT_BATCHES[name]
    ours = umt5.encode(prompts)
    with torch.no_grad():  # as in WanPipeline.__call__ (SDPA takes another kernel with grad)
        ref = wan_pipe._get_t5_prompt_embeds(prompts, max_sequence_length=MAX_LEN, device=torch.device("cpu"))
    assert isinstance(umt5, UMT5TextEncoder) and umt5.text_dim == 32
    assert ours.shape == (len(prompts), MAX_LEN, 32) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)


def test_umt5_zero_past_true_length(umt5):
    prompts = PROMPT_BATCHES["two_lengths"] + PROMPT_BATCHES["truncated"] + PROMPT_BATCHES["empty"]
    emb = umt5.encode(prompts)
    # words + </s>, capped at MAX_LEN; the empty prompt is just </s>
    lengths = [min(len(p.split()) + 1, MAX_LEN) for p in prompts]
    assert lengths == [5, 14, MAX_LEN, 1]
    for row, n in zip(emb, lengths):
        assert (row[n:] == 0).all()
        assert (row[:n].abs().sum(dim=-1) > 0).all()


def test_umt5_output_dtype(umt5):
    emb = umt5.encode("a cat", dtype=torch.bfloat16)
    assert emb.shape == (1, MAX_LEN, 32) and emb.dtype == torch.bfloat16


def test_clean_prompt_matches_diffusers():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    text = "  a &amp;amp; b \n\t c  "
    assert clean_prompt(text) == prompt_clean(text) == "a & b c"


def test_text_encoder_errors(root, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_te"):
        build_text_encoder(TextEncoderConfig(kind="umt5", path="missing_te"), root)
    # the text encoder exists, the tokenizer beside it does not
    (tmp_path / "text_encoder").symlink_to(root / "text_encoder")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        build_text_encoder(TextEncoderConfig(kind="umt5", path="text_encoder"), tmp_path)
    with pytest.raises(ValueError, match=r"'clip'.*none, tokens, umt5"):
        build_text_encoder(TextEncoderConfig(kind="clip"), root)
    assert build_text_encoder(TextEncoderConfig(kind="none"), root) is None


def test_text_encoder_absolute_tokenizer_path(root, tmp_path):
    te, tok = str(root / "text_encoder"), str(root / "tokenizer")
    cfg = TextEncoderConfig(kind="umt5", path=te, tokenizer_path=tok, max_length=8)
    enc = build_text_encoder(cfg, tmp_path)
    assert enc.encode(["a cat", "a dog"]).shape == (2, 8, 32)


# -- codecs -------------------------------------------------------------------------


def test_wan_vae_shapes(wan_vae):
    assert isinstance(wan_vae, WanVAECodec)
    assert (wan_vae.latent_channels, wan_vae.temporal_factor, wan_vae.spatial_factor) == (4, 4, 8)
    x = _video(2, 9, 32, 48)
    z = wan_vae.encode(x)
    assert wan_vae.latent_shape(9, 32, 48) == (4, 3, 4, 6) == tuple(z.shape[1:])
    y = wan_vae.decode(z)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= -1 and y.max() <= 1


def test_wan_vae_normalisation_matches_diffusers(root, wan_vae):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(root / "vae").eval()
    c = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1)
    x = _video(1, 5, 16, 24, seed=1)
    with torch.no_grad():
        raw = vae.encode(x).latent_dist.mode()
        z = wan_vae.encode(x)
        assert not torch.allclose(z, raw)  # the normalisation is not the identity
        torch.testing.assert_close(z, (raw - mean) * inv_std, rtol=0, atol=1e-6)
        ref = vae.decode(z / inv_std + mean, return_dict=False)[0]
    torch.testing.assert_close(wan_vae.decode(z), ref, rtol=0, atol=1e-6)


def test_wan_vae_frame_check(wan_vae):
    with pytest.raises(ValueError, match=r"4k\+1.*use 5 or 9"):
        wan_vae.check_frames(8)
    with pytest.raises(ValueError, match=r"4k\+1"):
        wan_vae.encode(_video(1, 8, 16, 16))
    with pytest.raises(ValueError, match="divisible by 8"):
        wan_vae.encode(_video(1, 5, 20, 16))
    for t in (1, 5, 81):
        wan_vae.check_frames(t)


def test_codec_errors(root):
    with pytest.raises(FileNotFoundError, match="no_vae"):
        build_codec(CodecConfig(kind="wan_vae", path="no_vae"), root)
    with pytest.raises(ValueError, match=r"'vqgan'.*none, pixel, wan_vae"):
        build_codec(CodecConfig(kind="vqgan"), root)
    assert build_codec(CodecConfig(kind="none"), root) is None


def test_pixel_codec_round_trip(root):
    codec = build_codec(CodecConfig(kind="pixel"), root)
    assert isinstance(codec, PixelCodec)
    x = _video(2, 7, 10, 12)
    z = codec.encode(x)
    assert codec.latent_shape(7, 10, 12) == (3, 7, 10, 12) == tuple(z.shape[1:])
    assert torch.equal(codec.decode(z), x)
    with pytest.raises(ValueError, match=">= 1"):
        codec.check_frames(0)


def test_uint8_round_trip():
    frames = torch.randint(0, 256, (2, 3, 4, 5, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    video = uint8_to_video(frames)  # (B, 3, T, H, W)
    assert video.shape == (2, 3, 3, 4, 5) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert torch.equal(video_to_uint8(video), frames)
    ends = video_to_uint8(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 5, 1, 1).expand(1, 3, 5, 1, 1))
    assert ends[0, :, 0, 0, 0].tolist() == [0, 0, 128, 255, 255]
