"""HunyuanVideo's text encoders and VAE through flgengine give what diffusers'
HunyuanVideoPipeline computes (tiny random parts, fp32)."""

import pytest
import torch

pytest.importorskip("diffusers")

from flgengine.codec import HunyuanVAECodec  # noqa: E402
from flgengine.text import HUNYUAN_TEMPLATE, HunyuanTextEncoder  # noqa: E402
from helpers import assert_close, capture_latents  # noqa: E402
from tiny_hunyuan import make_tiny_hunyuan_text, make_tiny_hunyuan_vae, tiny_crop_start  # noqa: E402


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("hunyuan")
    make_tiny_hunyuan_text(d)
    make_tiny_hunyuan_vae(d)
    return d


def _diffusers_pipeline(d):
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from diffusers import HunyuanVideoTransformer3DModel
    from transformers import AutoTokenizer, CLIPTextModel, LlamaModel

    transformer = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                                 num_layers=1, num_single_layers=1, num_refiner_layers=1,
                                                 text_embed_dim=24, pooled_projection_dim=12, rope_axes_dim=(2, 2, 4))
    return HunyuanVideoPipeline(
        text_encoder=LlamaModel.from_pretrained(d / "text_encoder").eval(), tokenizer=AutoTokenizer.from_pretrained(d / "tokenizer"),
        text_encoder_2=CLIPTextModel.from_pretrained(d / "text_encoder_2").eval(),
        tokenizer_2=AutoTokenizer.from_pretrained(d / "tokenizer_2"), transformer=transformer,
        vae=AutoencoderKLHunyuanVideo.from_pretrained(d / "vae").eval(), scheduler=FlowMatchEulerDiscreteScheduler())


def test_text_encoders_match_the_pipelines_encode_prompt(parts):
    crop = tiny_crop_start(parts, HUNYUAN_TEMPLATE)
    ours = HunyuanTextEncoder(parts / "text_encoder", parts / "tokenizer", parts / "text_encoder_2", parts / "tokenizer_2",
                              max_length=16, crop_start=crop)
    prompts = ["a red cat runs slowly", "the dog", "a big old horse walks through the dark forest near the river"]
    context, extra = ours.encode_inputs(prompts)
    with torch.no_grad():
        embeds, pooled, mask = _diffusers_pipeline(parts).encode_prompt(
            prompts, prompt_template={"template": HUNYUAN_TEMPLATE, "crop_start": crop}, max_sequence_length=16,
            device=torch.device("cpu"))
    assert context.shape == (3, 16, 24) and extra["pooled_text"].shape == (3, 12)
    assert_close(context, embeds, 1e-6, "Llama states")
    assert torch.equal(extra["context_mask"], mask)
    assert extra["context_mask"].sum(1).tolist() == [6, 3, 13]  # the prompt's words + <|eot_id|>
    assert_close(extra["pooled_text"], pooled, 1e-6, "CLIP pooled")
    # the packed text the distillation stages carry: the same inputs, read back
    from flgengine.model.hunyuan import unpack_text

    c2, m2, p2 = unpack_text(ours.encode(prompts), 12)
    assert torch.equal(m2, extra["context_mask"]) and torch.equal(p2, extra["pooled_text"])
    assert torch.equal(c2, context * m2[..., None])


def test_vae_codec_matches_the_pipelines_latents(parts):
    from diffusers import AutoencoderKLHunyuanVideo

    codec = HunyuanVAECodec(parts / "vae")
    vae = AutoencoderKLHunyuanVideo.from_pretrained(parts / "vae").eval()
    assert (codec.latent_channels, codec.temporal_factor, codec.spatial_factor) == (4, 4, 8)
    video = torch.rand(1, 3, 5, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = codec.encode(video)
        assert_close(z, vae.encode(video).latent_dist.mode() * 0.6, 1e-6, "encode")
        assert z.shape == (1, 4, 2, 2, 3) and codec.latent_shape(5, 16, 24) == (4, 2, 2, 3)
        # the pipeline's decode: latents / scaling_factor through the VAE
        assert_close(codec.decode(z), vae.decode(z / 0.6, return_dict=False)[0].clamp(-1, 1), 1e-6, "decode")
    with pytest.raises(ValueError, match="4k\\+1 frames"):
        codec.encode(torch.zeros(1, 3, 4, 16, 24))


# ---- a whole pipeline: convert -> bundle -> generate() ------------------------------------------

@pytest.mark.parametrize("guided", [True, False], ids=["guidance-distilled", "cfg"])
def test_generate_matches_diffusers_hunyuan_video_pipeline(guided, tmp_path):
    import dataclasses

    import flgengine
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import AutoTokenizer, CLIPTextModel, LlamaModel

    from flgengine.config import PipelineConfig
    from flgengine.convert import bundle_from_diffusers
    from tiny_hunyuan import make_tiny_hunyuan_pipeline

    src = make_tiny_hunyuan_pipeline(tmp_path / "hf", guidance_embeds=guided)
    bundle = bundle_from_diffusers(src, tmp_path / "bundle", num_frames=5, height=16, width=32, steps=4, guidance=6.0,
                                   max_length=16)
    p = PipelineConfig.from_json(bundle / "pipeline.json")
    assert p.text_encoder.kind == "hunyuan" and p.codec.kind == "hunyuan_vae" and p.sampler.shift == 7.0
    assert (p.sampler.embedded_guidance, p.sampler.guidance) == ((6.0, 1.0) if guided else (None, 6.0))
    crop = tiny_crop_start(src, HUNYUAN_TEMPLATE)  # the tiny tokenizer's (95 for HunyuanVideo's)
    p = dataclasses.replace(p, text_encoder=dataclasses.replace(p.text_encoder, crop_start=crop))
    p.to_json(bundle / "pipeline.json")

    pipe = flgengine.load(bundle, device="cpu")
    seen = capture_latents(pipe)
    ours = pipe(["a red cat runs", "the dog walks near the river"], seed=3, progress=False)
    ref_pipe = HunyuanVideoPipeline(
        transformer=HunyuanVideoTransformer3DModel.from_pretrained(src / "transformer").eval(),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(src / "scheduler"),
        text_encoder=LlamaModel.from_pretrained(src / "text_encoder").eval(),
        tokenizer=AutoTokenizer.from_pretrained(src / "tokenizer"),
        text_encoder_2=CLIPTextModel.from_pretrained(src / "text_encoder_2").eval(),
        tokenizer_2=AutoTokenizer.from_pretrained(src / "tokenizer_2"),
        vae=AutoencoderKLHunyuanVideo.from_pretrained(src / "vae").eval())
    noise = torch.randn((2, 4, 2, 2, 4), generator=torch.Generator().manual_seed(3))  # as generate() draws it
    # diffusers: guidance_scale is the embedded scale; true_cfg_scale with a negative prompt is CFG
    kw = dict(prompt=["a red cat runs", "the dog walks near the river"], height=16, width=32, num_frames=5,
              num_inference_steps=4, max_sequence_length=16, latents=noise,
              prompt_template={"template": HUNYUAN_TEMPLATE, "crop_start": crop})
    kw |= dict(guidance_scale=6.0) if guided else dict(true_cfg_scale=6.0, negative_prompt=["", ""])
    with torch.no_grad():
        ref_latents = ref_pipe(**kw, output_type="latent").frames
        ref = ref_pipe(**kw, output_type="pt").frames  # (B, T, 3, H, W) in [0, 1]
    assert_close(seen["latents"], ref_latents, 1e-5, "sampled latents")
    ref = (ref.permute(0, 1, 3, 4, 2) * 255).round()
    assert ours.shape == ref.shape == (2, 5, 16, 32, 3)
    diff = (ours.float() - ref).abs()
    assert diff.max() <= 1 and diff.mean() < 0.02, (diff.max(), diff.mean())  # uint8 rounding of equal videos
