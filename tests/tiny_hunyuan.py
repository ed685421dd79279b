"""Tiny random HunyuanVideo text encoders and VAE for the tests, built locally (no downloads),
laid out like a diffusers HunyuanVideo repo: `text_encoder/` (Llama) + `tokenizer/`,
`text_encoder_2/` (CLIP-L) + `tokenizer_2/`, `vae/` (AutoencoderKLHunyuanVideo). Seeded."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_wan import TINY_WORDS

__all__ = ["make_tiny_hunyuan_text", "make_tiny_hunyuan_vae", "make_tiny_hunyuan_pipeline", "tiny_crop_start"]

LLAMA_SPECIALS = ("<pad>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<unk>")
CLIP_SPECIALS = ("<pad>", "<|startoftext|>", "<|endoftext|>", "<unk>")


def _word_tokenizer(specials, words, bos, eos, max_length):
    from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, normalized=False) for s in specials])
    single = f"{bos} $A" + (f" {eos}" if eos else "")
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(s, vocab[s]) for s in (bos, eos) if s])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token=bos,
                                   eos_token=eos or None, model_max_length=max_length), vocab


def make_tiny_hunyuan_text(dir: Path, hidden: int = 24, clip_hidden: int = 12, seed: int = 0) -> Path:
    """A tiny random LlamaModel (4 layers) + word-level tokenizer with the template's special
    tokens, and a tiny CLIPTextModel + tokenizer; returns `dir`."""
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    dir = Path(dir)
    words = TINY_WORDS + ("system", "user", "describe", "video", "detailing", "following", "aspects")
    words = tuple(dict.fromkeys(words))
    tok, vocab = _word_tokenizer(LLAMA_SPECIALS, words, "<|begin_of_text|>", None, 512)
    tok.save_pretrained(dir / "tokenizer")
    clip_tok, clip_vocab = _word_tokenizer(CLIP_SPECIALS, TINY_WORDS, "<|startoftext|>", "<|endoftext|>", 77)
    clip_tok.save_pretrained(dir / "tokenizer_2")
    torch.manual_seed(seed)
    LlamaModel(LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           pad_token_id=vocab["<pad>"], bos_token_id=vocab["<|begin_of_text|>"])
               ).eval().save_pretrained(dir / "text_encoder")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_vocab), hidden_size=clip_hidden, intermediate_size=2 * clip_hidden,
                                 num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                 pad_token_id=clip_vocab["<pad>"], bos_token_id=clip_vocab["<|startoftext|>"],
                                 eos_token_id=clip_vocab["<|endoftext|>"])).eval().save_pretrained(dir / "text_encoder_2")
    return dir


def tiny_crop_start(dir: Path, template: str) -> int:
    """The tokens of `template` before its prompt with the tiny Llama tokenizer (HunyuanVideo's
    crop_start, 95 for its real tokenizer)."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(Path(dir) / "tokenizer")(template.split("{}")[0]).input_ids)


def make_tiny_hunyuan_vae(dir: Path, latent_channels: int = 4, seed: int = 0) -> Path:
    """A tiny random AutoencoderKLHunyuanVideo (temporal factor 4, spatial 8) in `dir/vae`."""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(latent_channels=latent_channels, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                    norm_num_groups=4, scaling_factor=0.6)
    vae.eval().save_pretrained(Path(dir) / "vae")
    return Path(dir) / "vae"


def make_tiny_hunyuan_pipeline(dir: Path, *, guidance_embeds: bool = True, num_layers: int = 2,
                               num_single_layers: int = 3, seed: int = 0) -> Path:
    """A diffusers HunyuanVideoPipeline directory of tiny random parts: the text encoders, the
    VAE, a HunyuanVideoTransformer3DModel (2 heads of 8, every weight off its init) and a
    flow-matching scheduler of shift 7."""
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel

    dir = Path(dir)
    make_tiny_hunyuan_text(dir, seed=seed)
    make_tiny_hunyuan_vae(dir, seed=seed)
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=num_layers,
        num_single_layers=num_single_layers, num_refiner_layers=1, mlp_ratio=2.0, guidance_embeds=guidance_embeds,
        text_embed_dim=24, pooled_projection_dim=12, rope_axes_dim=(2, 2, 4)).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    transformer.save_pretrained(dir / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=7.0).save_pretrained(dir / "scheduler")
    (dir / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideoPipeline"}))
    return dir
