"""Tiny random HunyuanVideo text encoders and VAE for the tests, built locally (no downloads),
laid out like a diffusers HunyuanVideo repo: `text_encoder/` (Llama) + `tokenizer/`,
`text_encoder_2/` (CLIP-L) + `tokenizer_2/`, `vae/` (AutoencoderKLHunyuanVideo). Seeded."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_wan import TINY_WORDS

__all__ = ["make_tiny_hunyuan_text", "make_tiny_hunyuan_vae", "tiny_crop_start"]

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
