"""Text encoders: prompts -> embeddings `(B, L, text_dim)` for the DiT's cross-attention.

`UMT5TextEncoder` is Wan's umT5 (transformers), matching diffusers' `WanPipeline`
prompt encoding exactly. `build_text_encoder` turns a `TextEncoderConfig` into an
encoder through the `TEXT_ENCODERS` registry (kind -> factory).
"""

from __future__ import annotations

import contextlib

import html
from pathlib import Path
from typing import Callable

import torch

from .config import TextEncoderConfig

__all__ = ["TextEncoder", "UMT5TextEncoder", "TEXT_ENCODERS", "build_text_encoder", "clean_prompt"]

_EXTRA_HINT = "pip install 'flgengine[diffusers]'"


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {path}")
    return path


def clean_prompt(text: str) -> str:
    """diffusers' Wan `prompt_clean`: ftfy.fix_text (only if ftfy is installed, as in
    diffusers), HTML-unescape twice, strip, collapse whitespace runs to one space."""
    import regex  # a transformers dependency; its \\s is the one diffusers uses

    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """Base: `encode(prompts)` -> `(B, L, text_dim)` float tensor, no gradients."""

    text_dim: int

    def encode(self, prompts: list[str], device=None, dtype=None) -> torch.Tensor:
        raise NotImplementedError


@contextlib.contextmanager
def _quiet_transformers():
    """No weight-loading progress bar of transformers' own inside ours."""
    from transformers.utils import logging as tlog

    was_enabled = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            tlog.enable_progress_bar()


class UMT5TextEncoder(TextEncoder):
    """Wan's umT5 encoder (`text_encoder/`) and tokenizer (`tokenizer/`) from local dirs.

    `encode` reproduces `WanPipeline._get_t5_prompt_embeds`: cleaned prompts, padded
    and truncated to `max_length` tokens (with `</s>`), encoded with the attention mask,
    and every position past a prompt's true length set to exactly zero.
    """

    def __init__(self, path: str | Path, tokenizer_path: str | Path, max_length: int = 512, device=None, dtype=None):
        try:
            from transformers import AutoTokenizer, UMT5EncoderModel
        except ImportError as e:
            raise ImportError(f"the umt5 text encoder needs transformers: {_EXTRA_HINT}") from e
        path = _need_dir(Path(path), "umT5 text encoder")
        tokenizer_path = _need_dir(Path(tokenizer_path), "umT5 tokenizer")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        kwargs = {} if dtype is None else {"torch_dtype": dtype}
        with _quiet_transformers():
            self.model = UMT5EncoderModel.from_pretrained(path, **kwargs).to(device).eval()
        self.max_length = max_length
        self.text_dim = self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: str | list[str], device=None, dtype=None) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        model_device = self.model.device
        ids, mask = tokens.input_ids.to(model_device), tokens.attention_mask.to(model_device)  # (B, L)
        emb = self.model(ids, mask).last_hidden_state  # (B, L, text_dim)
        emb = emb.to(device=device or model_device, dtype=dtype or self.model.dtype)
        # diffusers keeps the first `seq_len` rows of each prompt and zero-pads the rest
        seq_lens = mask.gt(0).sum(dim=1).to(emb.device)  # (B,)
        keep = torch.arange(emb.shape[1], device=emb.device)[None, :] < seq_lens[:, None]  # (B, L)
        return emb.masked_fill(~keep[..., None], 0.0)


def _resolve(root: Path, path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else Path(root) / path


def _build_umt5(cfg: TextEncoderConfig, root: Path, device=None, dtype=None) -> UMT5TextEncoder:
    if cfg.path is None:
        raise ValueError("text encoder kind 'umt5' needs a path (the text_encoder directory)")
    path = _resolve(root, cfg.path)
    tokenizer_path = path.parent / "tokenizer" if cfg.tokenizer_path is None else _resolve(root, cfg.tokenizer_path)
    return UMT5TextEncoder(path, tokenizer_path, cfg.max_length, device=device, dtype=dtype)


TEXT_ENCODERS: dict[str, Callable[..., TextEncoder | None]] = {
    "umt5": _build_umt5,
    "none": lambda cfg, root, device=None, dtype=None: None,
}


def build_text_encoder(cfg: TextEncoderConfig, root: Path, device=None, dtype=None) -> TextEncoder | None:
    """The encoder `cfg` names (paths relative to `root`), or None for kind "none"."""
    factory = TEXT_ENCODERS.get(cfg.kind)
    if factory is None:
        raise ValueError(f"unknown text encoder kind {cfg.kind!r} (known kinds: {', '.join(sorted(TEXT_ENCODERS))})")
    return factory(cfg, Path(root), device=device, dtype=dtype)
