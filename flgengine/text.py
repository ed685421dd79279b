"""Text encoders: prompts -> embeddings `(B, L, text_dim)` for the DiT's cross-attention.

`UMT5TextEncoder` is Wan's umT5 (transformers), matching diffusers' `WanPipeline`
prompt encoding exactly. `TokenTextEncoder` is the small learned encoder of built-in
worlds (word tokens + positions, trained with the teacher, stored in the bundle). `build_text_encoder` turns a `TextEncoderConfig` into an
encoder through the `TEXT_ENCODERS` registry (kind -> factory).
"""

from __future__ import annotations

import contextlib
import html
import json
import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .config import TextEncoderConfig

__all__ = ["TextEncoder", "UMT5TextEncoder", "HunyuanTextEncoder", "TokenTextEncoder", "TEXT_ENCODERS", "build_text_encoder", "clean_prompt"]

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
    """Base: `encode(prompts)` -> `(B, L, text_dim)` float tensor, no gradients: what the DiT
    reads as `context` (HunyuanVideo's: its packed text)."""

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


# HunyuanVideo's prompt template (its diffusers pipeline's default); the tokens before the
# prompt (95 with its Llama tokenizer) are cropped off the hidden states
HUNYUAN_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
HUNYUAN_CROP_START = 95


class HunyuanTextEncoder(TextEncoder):
    """HunyuanVideo's two text encoders from local dirs, as its diffusers pipeline runs them:

        context      Llama (`text_encoder/`, `tokenizer/`): the prompt put in `template`, padded
                     and truncated to crop_start + max_length tokens, hidden states of the layer
                     `skip_layers + 1` from the end, the template's first crop_start tokens cut off
                     -> (B, max_length, text_dim)
        context_mask the Llama attention mask of those tokens -> (B, max_length), real tokens first
        pooled_text  CLIP-L (`text_encoder_2/`, `tokenizer_2/`): the pooled output of the prompt
                     itself, 77 tokens -> (B, pooled_dim)
    """

    def __init__(self, path: str | Path, tokenizer_path: str | Path, clip_path: str | Path,
                 clip_tokenizer_path: str | Path, max_length: int = 256, template: str = HUNYUAN_TEMPLATE,
                 crop_start: int = HUNYUAN_CROP_START, skip_layers: int = 2, device=None, dtype=None):
        try:
            from transformers import AutoModel, AutoTokenizer, CLIPTextModel
        except ImportError as e:
            raise ImportError(f"the hunyuan text encoder needs transformers: {_EXTRA_HINT}") from e
        if "{}" not in template:
            raise ValueError("the prompt template must hold {} where the prompt goes")
        dirs = [_need_dir(Path(p), what) for p, what in ((path, "Llama text encoder"), (tokenizer_path, "Llama tokenizer"),
                                                         (clip_path, "CLIP text encoder"),
                                                         (clip_tokenizer_path, "CLIP tokenizer"))]
        kwargs = {} if dtype is None else {"torch_dtype": dtype}
        self.tokenizer, self.clip_tokenizer = AutoTokenizer.from_pretrained(dirs[1]), AutoTokenizer.from_pretrained(dirs[3])
        with _quiet_transformers():
            self.model = AutoModel.from_pretrained(dirs[0], **kwargs).to(device).eval()
            self.clip = CLIPTextModel.from_pretrained(dirs[2], **kwargs).to(device).eval()
        self.max_length, self.template, self.crop_start, self.skip_layers = max_length, template, crop_start, skip_layers
        self.text_dim, self.pooled_dim = self.model.config.hidden_size, self.clip.config.hidden_size

    @torch.no_grad()
    def encode_inputs(self, prompts: str | list[str], device=None, dtype=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        dev = self.model.device
        tokens = self.tokenizer([self.template.format(p) for p in prompts], max_length=self.max_length + self.crop_start,
                                padding="max_length", truncation=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(dev), tokens.attention_mask.to(dev)  # (B, crop_start + max_length)
        states = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        context = states[-(self.skip_layers + 1)][:, self.crop_start:]  # (B, max_length, text_dim)
        clip_ids = self.clip_tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                       return_tensors="pt").input_ids.to(self.clip.device)
        pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output  # (B, pooled_dim)
        out = dict(device=device or dev, dtype=dtype or self.model.dtype)
        return context.to(**out), {"context_mask": mask[:, self.crop_start:].to(device or dev),
                                   "pooled_text": pooled.to(**out)}

    def encode(self, prompts: str | list[str], device=None, dtype=None) -> torch.Tensor:
        """The packed text (flgengine.model.hunyuan.pack_text): (B, max_length + 1, text_dim), the
        one tensor the pipeline, engines, training shards and the distillation stages carry."""
        from .model.hunyuan import pack_text

        context, extra = self.encode_inputs(prompts, device=device, dtype=dtype)
        return pack_text(context, extra["context_mask"], extra["pooled_text"])


class WordMixer(nn.Module):
    """One pre-norm transformer layer over a prompt's words (single head, padding masked).

    h: (B, L, dim), words: (B, L) bool -> (B, L, dim). A prompt with no words (the empty
    prompt) attends uniformly over its padding; the caller zeroes padding afterwards.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, h: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)  # 3 x (B, L, dim)
        logits = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5  # (B, L, L)
        logits = logits.masked_fill(~words[:, None, :], -1e9)  # finite: an all-padding row stays finite
        h = h + self.o(logits.softmax(dim=-1) @ v)
        return h + self.fc2(nn.functional.gelu(self.fc1(self.norm2(h)), approximate="tanh"))


class TokenTextEncoder(nn.Module, TextEncoder):
    """Learned word embeddings + positions, then `layers` small transformer layers over
    the words: any string -> `(L, dim)` per prompt.

    Lowercase words (punctuation ignored) map to ids; unknown words map to `<unk>`.
    Up to `max_length` words are kept; positions past the prompt are exactly zero, so
    the empty prompt (the unconditional input of CFG) encodes to all zeros.
    The transformer layers make every word's state carry the whole prompt (as umT5's
    states do for Wan): without them, a DiT's cross-attention that has learned to look
    at one word gets no gradient from the others, and a word it never looks at (in the
    shapes world: the direction) is never learned.
    Stored as `config.json` (vocab, max_length, dim, layers) + `model.safetensors`.
    """

    PAD, UNK = "<pad>", "<unk>"

    def __init__(self, vocab: list[str], max_length: int = 8, dim: int = 64, layers: int = 1):
        super().__init__()
        self.vocab = [self.PAD, self.UNK] + [w for w in vocab if w not in (self.PAD, self.UNK)]
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.max_length, self.text_dim = max_length, dim
        self.tok = nn.Embedding(len(self.vocab), dim)
        self.pos = nn.Embedding(max_length, dim)
        nn.init.normal_(self.tok.weight, std=1.0)
        nn.init.normal_(self.pos.weight, std=0.1)
        self.layers = nn.ModuleList(WordMixer(dim) for _ in range(layers))

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_length) int64 ids, 0 = padding."""
        out = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for i, p in enumerate(prompts):
            words = re.findall(r"[a-z0-9]+", p.lower())[: self.max_length]
            out[i, : len(words)] = torch.tensor([self.ids.get(w, 1) for w in words], dtype=torch.long)
        return out

    def unknown_words(self, prompts: list[str]) -> list[str]:
        """The words of `prompts` (within max_length) this encoder has no embedding for, in order, once each."""
        seen = []
        for p in prompts:
            for w in re.findall(r"[a-z0-9]+", p.lower())[: self.max_length]:
                if w not in self.ids and w not in seen:
                    seen.append(w)
        return seen

    def forward(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenize(list(prompts)).to(self.tok.weight.device)  # (B, L)
        words = ids != 0  # (B, L)
        emb = self.tok(ids) + self.pos.weight[None]  # (B, L, dim)
        for layer in self.layers:
            emb = layer(emb, words)
        return emb * words[..., None]

    @torch.no_grad()
    def encode(self, prompts, device=None, dtype=None) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        emb = self.forward(prompts)
        return emb.to(device=device or emb.device, dtype=dtype or emb.dtype)

    def save(self, path: str | Path) -> Path:
        from .files import atomic_save_safetensors, atomic_write_text

        path = Path(path)
        atomic_save_safetensors(path / "model.safetensors", self.state_dict())
        atomic_write_text(path / "config.json", json.dumps(
            {"vocab": self.vocab[2:], "max_length": self.max_length, "dim": self.text_dim,
             "layers": len(self.layers)}, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, device=None) -> "TokenTextEncoder":
        from .files import BundleError, check_state_dict, load_safetensors

        path = _need_dir(Path(path), "token text encoder")
        try:
            cfg = json.loads((path / "config.json").read_text())
        except FileNotFoundError:
            raise BundleError(f"{path}/config.json: missing") from None
        except ValueError as e:
            raise BundleError(f"{path}/config.json: not valid JSON ({e})") from None
        if not isinstance(cfg, dict) or sorted(cfg) != ["dim", "layers", "max_length", "vocab"]:
            raise BundleError(f"{path}/config.json: needs exactly vocab, max_length, dim and layers, got "
                              f"{sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__}")
        vocab = cfg["vocab"]
        if not (isinstance(vocab, list) and vocab and all(isinstance(w, str) and w for w in vocab)):
            raise BundleError(f"{path}/config.json: key 'vocab' = {vocab!r:.80}: expected a list of words")
        for key, top in (("max_length", 4096), ("dim", 65536), ("layers", 64)):
            v = cfg[key]
            if type(v) is not int or not 1 <= v <= top:
                raise BundleError(f"{path}/config.json: key {key!r} = {v!r}: expected an integer in 1..{top}")
        where = f"{path}/model.safetensors"
        if not (path / "model.safetensors").is_file():
            raise BundleError(f"{where}: missing")
        sd = load_safetensors(path / "model.safetensors", where)
        expected = {"tok.weight": (len(vocab) + 2, cfg["dim"]), "pos.weight": (cfg["max_length"], cfg["dim"])}
        for key, shape in expected.items():  # before anything is allocated from the config
            if key not in sd or tuple(sd[key].shape) != shape:
                got = tuple(sd[key].shape) if key in sd else "missing"
                raise BundleError(f"{where}: tensor {key!r} is {got}, config.json implies {shape}")
        enc = cls(list(vocab), cfg["max_length"], cfg["dim"], cfg["layers"])
        check_state_dict(sd, {k: v.shape for k, v in enc.state_dict().items()}, where, "config.json")
        enc.load_state_dict(sd)
        return enc.to(device).eval().requires_grad_(False)


def _resolve(root: Path, path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else Path(root) / path


def _build_umt5(cfg: TextEncoderConfig, root: Path, device=None, dtype=None) -> UMT5TextEncoder:
    if cfg.path is None:
        raise ValueError("text encoder kind 'umt5' needs a path (the text_encoder directory)")
    path = _resolve(root, cfg.path)
    tokenizer_path = path.parent / "tokenizer" if cfg.tokenizer_path is None else _resolve(root, cfg.tokenizer_path)
    return UMT5TextEncoder(path, tokenizer_path, cfg.max_length, device=device, dtype=dtype)


def _build_hunyuan(cfg: TextEncoderConfig, root: Path, device=None, dtype=None) -> HunyuanTextEncoder:
    missing = [k for k in ("path", "tokenizer_path", "clip_path", "clip_tokenizer_path") if getattr(cfg, k) is None]
    if missing:
        raise ValueError(f"text encoder kind 'hunyuan' needs {', '.join(missing)} (Llama and CLIP-L directories)")
    paths = [_resolve(root, getattr(cfg, k)) for k in ("path", "tokenizer_path", "clip_path", "clip_tokenizer_path")]
    return HunyuanTextEncoder(*paths, max_length=cfg.max_length, template=cfg.template or HUNYUAN_TEMPLATE,
                              crop_start=HUNYUAN_CROP_START if cfg.crop_start is None else cfg.crop_start,
                              device=device, dtype=dtype)


def _build_tokens(cfg: TextEncoderConfig, root: Path, device=None, dtype=None) -> TokenTextEncoder:
    if cfg.path is None:
        raise ValueError("text encoder kind 'tokens' needs a path (its directory in the bundle)")
    return TokenTextEncoder.load(_resolve(root, cfg.path), device=device)


TEXT_ENCODERS: dict[str, Callable[..., TextEncoder | None]] = {
    "umt5": _build_umt5,
    "hunyuan": _build_hunyuan,
    "tokens": _build_tokens,
    "none": lambda cfg, root, device=None, dtype=None: None,
}


def build_text_encoder(cfg: TextEncoderConfig, root: Path, device=None, dtype=None) -> TextEncoder | None:
    """The encoder `cfg` names (paths relative to `root`), or None for kind "none"."""
    factory = TEXT_ENCODERS.get(cfg.kind)
    if factory is None:
        raise ValueError(f"unknown text encoder kind {cfg.kind!r} (known kinds: {', '.join(sorted(TEXT_ENCODERS))})")
    return factory(cfg, Path(root), device=device, dtype=dtype)
