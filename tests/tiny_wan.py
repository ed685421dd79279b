"""Tiny random Wan components for the tests, built locally (no downloads).

`make_tiny_umt5` writes a umT5 encoder and a word-level tokenizer laid out like a
diffusers Wan repo (`text_encoder/`, `tokenizer/`); `make_tiny_wan_vae` writes an
`AutoencoderKLWan` to `vae/`; `make_tiny_wan_bundle` puts both beside a random DiT as a
runnable bundle. All are seeded, so the same call gives the same weights.

    python tests/tiny_wan.py tiny-wan-bundle DIR [--student]
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["TINY_WORDS", "make_tiny_umt5", "make_tiny_wan_vae", "make_tiny_clip", "make_tiny_wan_bundle",
           "make_tiny_wan_i2v_bundle"]

# T5 layout: <pad> = 0, </s> = 1, <unk> = 2, then the words
_SPECIALS = ("<pad>", "</s>", "<unk>")
TINY_WORDS = tuple(
    """a an the and or of in on at to with from by is are was it its this that
    cat dog bird fish horse man woman child people car boat tree flower house street city
    sea river sky sun moon rain snow light fire water road forest mountain field
    red blue green yellow black white big small old young fast slow bright dark
    runs walks flies swims jumps sits stands dances plays rides falls shines moves
    video scene camera close shot slowly quickly through over under behind near""".split()
)


def make_tiny_umt5(dir: Path, d_model: int = 32, vocab_size: int = 128, max_length: int = 64, seed: int = 0) -> Path:
    """Saves a tiny random `UMT5EncoderModel` to `dir/text_encoder` and a lowercase
    word-level tokenizer (unknown words -> `<unk>`, `</s>` appended) to `dir/tokenizer`;
    returns `dir/text_encoder` (its tokenizer sits beside it, the default place)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {w: i for i, w in enumerate(_SPECIALS + TINY_WORDS)}
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size must be >= the tokenizer's {len(vocab)} tokens, got {vocab_size}")
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )
    dir = Path(dir)
    tokenizer.save_pretrained(dir / "tokenizer")

    torch.manual_seed(seed)
    cfg = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=max(1, d_model // 8),
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
    )
    UMT5EncoderModel(cfg).eval().save_pretrained(dir / "text_encoder")
    return dir / "text_encoder"


def make_tiny_wan_vae(dir: Path, z_dim: int = 4, base_dim: int = 8, seed: int = 0) -> Path:
    """Saves a tiny random `AutoencoderKLWan` (temporal factor 4, spatial factor 8, with
    non-trivial `latents_mean` / `latents_std`) to `dir/vae`; returns `dir/vae`."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=base_dim,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[round(0.3 * (i % 5) - 0.6, 4) for i in range(z_dim)],
        latents_std=[round(0.5 + 0.4 * (i % 4), 4) for i in range(z_dim)],
    )
    dir = Path(dir)
    vae.eval().save_pretrained(dir / "vae")
    return dir / "vae"


def make_tiny_clip(dir: Path, hidden: int = 16, image_size: int = 32, patch: int = 8, seed: int = 0) -> Path:
    """Saves a tiny random `CLIPVisionModel` to `dir/image_encoder` and its `CLIPImageProcessor`
    (shortest side to `image_size`, centre crop) to `dir/image_processor`, as Wan2.1-I2V repos
    lay them out; its tokens are (image_size / patch)^2 + 1 wide `hidden`."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch, projection_dim=hidden)
    dir = Path(dir)
    CLIPVisionModel(cfg).eval().save_pretrained(dir / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(dir / "image_processor")
    return dir / "image_encoder"


def make_tiny_wan_i2v_bundle(dir: Path, image: str, *, clip: bool = True, num_layers: int = 2, seed: int = 0) -> Path:
    """A runnable image-to-video bundle of random tiny Wan parts: `image` "first_frame"
    (Wan2.2-TI2V: a plain DiT, the image as the clean first latent frame) or "concat"
    (Wan2.1-I2V: noise + mask + image latents on 4 + 4 + 4 input channels; `clip`: CLIP
    image tokens through the DiT's image branch, text padded to 512 tokens as diffusers'
    Wan2.1-I2V transformer needs). Euler, 4 steps, CFG 3; 5 frames of 32x48 at 8 fps."""
    from flgengine.bundle import bundle_directory, write_bundle_files
    from flgengine.config import (CodecConfig, ImageEncoderConfig, ModelConfig, PipelineConfig, SamplerConfig,
                                  TextEncoderConfig)
    from flgengine.model import DiT

    clip = clip and image == "concat"
    max_length = 512 if clip else 24
    config = ModelConfig(in_channels=12 if image == "concat" else 4, out_channels=4, patch_size=(1, 2, 2), num_heads=2,
                         head_dim=8, ffn_dim=32, text_dim=32, freq_dim=16, num_layers=num_layers,
                         image_dim=16 if clip else None)
    torch.manual_seed(seed)
    model = DiT(config)
    with torch.no_grad():  # every weight off its init (norms at 1, biases at 0), as the parity tests do
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    encoder = ImageEncoderConfig(kind="clip", path="image_encoder", processor_path="image_processor") if clip \
        else ImageEncoderConfig()
    pipeline = PipelineConfig(
        text_encoder=TextEncoderConfig(kind="umt5", path="text_encoder", tokenizer_path="tokenizer",
                                       max_length=max_length),
        codec=CodecConfig(kind="wan_vae", path="vae"),
        sampler=SamplerConfig(kind="euler", num_steps=4, shift=3.0, guidance=3.0),
        num_frames=5, height=32, width=48, fps=8, image=image, image_encoder=encoder)
    with bundle_directory(dir) as tmp:
        make_tiny_umt5(tmp, d_model=32, max_length=max_length, seed=seed)
        make_tiny_wan_vae(tmp, z_dim=4, seed=seed)
        if clip:
            make_tiny_clip(tmp, hidden=16, seed=seed)
        write_bundle_files(tmp, model, pipeline, {"kind": f"tiny random Wan image-to-video ({image})", "seed": seed})
    return Path(dir)


def make_tiny_wan_i2v_pipeline(dir: Path, image: str, *, num_layers: int = 2, seed: int = 0) -> Path:
    """make_tiny_wan_i2v_bundle's parts as a diffusers WanImageToVideoPipeline directory:
    "concat" (Wan2.1-I2V, with CLIP) or "first_frame" (Wan2.2-TI2V: expand_timesteps)."""
    import json
    import shutil

    import flgengine
    from flgengine.convert import to_diffusers

    dir = Path(dir)
    src = make_tiny_wan_i2v_bundle(dir.parent / f".{dir.name}-bundle", image, num_layers=num_layers, seed=seed)
    for sub in ("text_encoder", "tokenizer", "vae", "image_encoder", "image_processor"):
        if (src / sub).is_dir():
            shutil.copytree(src / sub, dir / sub)
    to_diffusers(flgengine.load(src, device="cpu").dit, dir / "transformer")
    index = {"_class_name": "WanImageToVideoPipeline", "expand_timesteps": image == "first_frame"}
    (dir / "model_index.json").write_text(json.dumps(index))
    (dir / "scheduler").mkdir()
    (dir / "scheduler" / "scheduler_config.json").write_text(json.dumps({"flow_shift": 3.0}))  # the bundle's shift
    shutil.rmtree(src)
    return dir


def make_tiny_wan_bundle(dir: Path, *, student: bool = False, num_layers: int = 4, seed: int = 0) -> Path:
    """A runnable bundle of random tiny Wan parts: umT5 + Wan VAE + a Wan DiT.

    Teacher: Euler, 8 steps, CFG 5. `student=True`: a block-pruned DiT (every other block of `num_layers`
    kept, plus the last) with a 4-step fewstep sampler,
    marked `distilled`. Defaults: 9 frames of 64x64 at 8 fps.
    """
    from flgengine.bundle import bundle_directory, write_bundle_files
    from flgengine.config import CodecConfig, ModelConfig, PipelineConfig, SamplerConfig, TextEncoderConfig
    from flgengine.model import DiT

    dir = Path(dir)
    keep = sorted({0, num_layers - 1, *range(0, num_layers, 2)}) if student else None
    config = ModelConfig(in_channels=4, out_channels=4, patch_size=(1, 2, 2), num_heads=2, head_dim=16, ffn_dim=64,
                         text_dim=32, freq_dim=32, num_layers=num_layers, block_ids=keep)
    torch.manual_seed(seed)
    model = DiT(config)
    if student:
        sampler = SamplerConfig(kind="fewstep", num_steps=4, shift=5.0, guidance=0.0, sigmas=[1.0, 0.94, 0.83, 0.63])
    else:
        sampler = SamplerConfig(kind="euler", num_steps=8, shift=5.0, guidance=5.0)
    pipeline = PipelineConfig(
        text_encoder=TextEncoderConfig(kind="umt5", path="text_encoder", tokenizer_path="tokenizer", max_length=24),
        codec=CodecConfig(kind="wan_vae", path="vae"),
        sampler=sampler, num_frames=9, height=64, width=64, fps=8, distilled=student,
    )
    provenance = {"kind": "tiny random Wan " + ("student" if student else "teacher"), "seed": seed,
                  "note": "random weights for tests and the demo; its videos are noise-like"}
    with bundle_directory(dir) as tmp:
        make_tiny_umt5(tmp, d_model=32, max_length=24, seed=seed)
        make_tiny_wan_vae(tmp, z_dim=4, seed=seed)
        write_bundle_files(tmp, model, pipeline, provenance)
    return dir


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python tests/tiny_wan.py", description="Build tiny random components.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("tiny-wan-bundle", help="a runnable bundle of random tiny Wan parts (umT5, Wan VAE, DiT)")
    b.add_argument("dir")
    b.add_argument("--student", action="store_true", help="a block-pruned 4-step student instead of a teacher")
    args = p.parse_args(argv)
    path = make_tiny_wan_bundle(Path(args.dir), student=args.student)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
