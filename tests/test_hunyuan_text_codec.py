"""HunyuanVideo's text encoders and VAE through flgengine give what diffusers'
HunyuanVideoPipeline computes (tiny random parts, fp32)."""

import pytest
import torch

pytest.importorskip("diffusers")

from flgengine.codec import HunyuanVAECodec  # noqa: E402
from flgengine.text import HUNYUAN_TEMPLATE, HunyuanTextEncoder  # noqa: E402
from helpers import assert_close  # noqa: E402
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
    assert torch.equal(ours.encode(prompts), context)


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
