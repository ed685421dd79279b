"""Where one text-to-video generation's time goes: text encoder, the DiT's sampling loop and the
VAE decode, measured in one run (random weights; what each part costs does not depend on them).

Wan2.1-1.3B at 480p x 81 frames (GPU, `gpu` marker): umT5-XXL (24 layers, width 4096) over the
512 padded prompt tokens the Wan pipelines encode; the 30%-block-pruned student's 4-step loop (no
CFG; bf16, and FP8 where the GPU has it); diffusers' `AutoencoderKLWan` (Wan2.1's VAE) decoding
the (16, 21, 60, 104) latents to 81 frames of 480 x 832 through `WanVAECodec.decode`, in the
pipeline's dtype (bf16). A small version of each runs on the CPU, to check the benchmark itself.
Each part's share of the total is reported: the decode is what comes next after the DiT.
"""

from __future__ import annotations

import gc

import pytest
import torch

from test_bench_dit import SMALL, SMALL_LATENT, WAN_1_3B, WAN_LATENT, _keep_70_percent
from timing import median_seconds

# umT5-XXL (Wan's text encoder) and a small stand-in
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False)
UMT5_SMALL = dict(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False)
WAN_VAE_SMALL = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
SIZES = {  # DiT config, latent, umT5 config, prompt tokens, VAE config (None: Wan2.1's default)
    "small": (SMALL, SMALL_LATENT, UMT5_SMALL, 32, WAN_VAE_SMALL),
    "wan1.3b": (WAN_1_3B, WAN_LATENT, UMT5_XXL, 512, None),
}


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _text_encoder_seconds(cfg: dict, tokens: int, device, dtype) -> tuple[float, int]:
    """umT5 encoder forward over `tokens` padded prompt tokens (60 real), as UMT5TextEncoder.encode."""
    from transformers import UMT5Config, UMT5EncoderModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no fp32 copy of 5.7 B weights
    try:
        with torch.device(device):
            model = UMT5EncoderModel(UMT5Config(**cfg)).eval()
    finally:
        torch.set_default_dtype(default)
    ids = torch.randint(0, cfg["vocab_size"], (1, tokens), device=device)
    mask = (torch.arange(tokens, device=device) < min(60, tokens)).long()[None]
    with torch.no_grad():
        t = median_seconds(lambda: model(ids, mask).last_hidden_state, torch.device(device), repeat=5, warmup=1)
    return t, sum(p.numel() for p in model.parameters())


def _dit_loop_seconds(base: dict, latent, text_len: int, text_dim: int, device, dtype, precision: str) -> float:
    from flgengine.config import ModelConfig
    from flgengine.model import DiT
    from flgengine.model.precision import set_precision

    cfg = ModelConfig(**{**base, "text_dim": text_dim}, block_ids=_keep_70_percent(base["num_layers"]))
    torch.manual_seed(0)
    with torch.device(device):
        model = set_precision(DiT(cfg).cast(dtype).eval(), precision)
    x = torch.randn(latent, device=device, dtype=dtype)
    ctx = torch.randn(1, text_len, text_dim, device=device, dtype=dtype)

    def loop():
        z = x
        for t in (1000.0, 750.0, 500.0, 250.0):
            z = z - 0.25 * model(z, torch.tensor([t], device=device), ctx)
        return z

    with torch.no_grad():
        return median_seconds(loop, torch.device(device), repeat=3, warmup=1)


def _vae_decode_seconds(cfg: dict | None, latent, device, dtype) -> float:
    from diffusers import AutoencoderKLWan

    from flgengine.codec import WanVAECodec

    torch.manual_seed(0)
    codec = WanVAECodec.__new__(WanVAECodec)  # the codec around an in-memory VAE (no directory)
    with torch.device(device):
        codec.vae = AutoencoderKLWan(**(cfg or {})).to(dtype).eval()
    codec._setup(codec.vae.config)
    z = torch.randn(latent[0], codec.latent_channels, *latent[2:], device=device)
    video = codec.decode(z)
    assert video.shape[2] == 1 + (latent[2] - 1) * codec.temporal_factor  # 81 frames from 21 latent frames
    return median_seconds(lambda: codec.decode(z), torch.device(device), repeat=3, warmup=1)


@pytest.mark.parametrize("size", [pytest.param("small", id="cpu-small"),
                                  pytest.param("wan1.3b", id="cuda-wan1.3b-480p", marks=pytest.mark.gpu)])
def test_generation_time_split(benchmark, size):
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    base, latent, umt5, tokens, vae = SIZES[size]
    device = "cuda" if size != "small" else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    parts = {}  # each part's model is built, timed and freed (_free) before the next
    parts["text encoder"], text_params = _text_encoder_seconds(umt5, tokens, device, dtype)
    _free()
    parts["DiT 4-step loop (bf16)"] = _dit_loop_seconds(base, latent, tokens, umt5["d_model"], device, dtype, "bf16")
    _free()
    fp8 = device == "cuda" and torch.cuda.get_device_capability() >= (8, 9)
    if fp8:
        parts["DiT 4-step loop (FP8)"] = _dit_loop_seconds(base, latent, tokens, umt5["d_model"], device, dtype, "fp8")
        _free()
    parts["VAE decode"] = _vae_decode_seconds(vae, latent, device, dtype)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figures are the parts above, timed in one run
    loop = "DiT 4-step loop (FP8)" if fp8 else "DiT 4-step loop (bf16)"
    total = parts["text encoder"] + parts[loop] + parts["VAE decode"]
    shares = {k: v / total for k, v in parts.items()}
    benchmark.extra_info.update(seconds=parts, share_of_total=shares, total_seconds=total, total_with=loop,
                                text_encoder_params=text_params)
    print(f"\nend to end ({size}, {device}, total {total:.3f} s with the {loop}): " + ", ".join(
        f"{k} {v:.3f} s ({shares[k]:.0%})" for k, v in parts.items()))
