"""Wan (diffusers `WanTransformer3DModel`: Wan2.1 / Wan2.2 T2V, TI2V and I2V) <-> our DiT.

The DiT is the Wan transformer architecture, so conversion is a renaming of the state
dict plus a mapping of the config; `bundle_from_diffusers` also copies the umT5 text
encoder, its tokenizer and the VAE of a diffusers Wan pipeline directory into the bundle.
Wan2.1-I2V's image branch (`image_dim`, `added_kv_proj_dim`: the CLIP image embedder and the
image K/V of every cross-attention) converts; FLF2V's image position table is refused.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch

from ..bundle import BundleError, bundle_directory, write_bundle_files
from ..config import CodecConfig, ImageEncoderConfig, ModelConfig, PipelineConfig, SamplerConfig, TextEncoderConfig
from .source import heads_of, pipeline_transformer, scheduler_shift, write_diffusers_dir

TRANSFORMER_CLASS = "WanTransformer3DModel"

# (diffusers WanTransformer3DModel name, our DiT name); "{i}" is a block index. A name
# ending in "." is a module prefix (weight/bias follow), any other is a whole key.
NAMES = [
    ("patch_embedding.", "patch_embed."),
    ("condition_embedder.time_embedder.linear_1.", "time_embed.fc1."),
    ("condition_embedder.time_embedder.linear_2.", "time_embed.fc2."),
    ("condition_embedder.time_proj.", "time_proj."),
    ("condition_embedder.text_embedder.linear_1.", "text_embed.fc1."),
    ("condition_embedder.text_embedder.linear_2.", "text_embed.fc2."),
    ("blocks.{i}.scale_shift_table", "blocks.{i}.modulation"),
    ("blocks.{i}.attn1.to_q.", "blocks.{i}.self_attn.q."),
    ("blocks.{i}.attn1.to_k.", "blocks.{i}.self_attn.k."),
    ("blocks.{i}.attn1.to_v.", "blocks.{i}.self_attn.v."),
    ("blocks.{i}.attn1.to_out.0.", "blocks.{i}.self_attn.o."),
    ("blocks.{i}.attn1.norm_q.", "blocks.{i}.self_attn.norm_q."),
    ("blocks.{i}.attn1.norm_k.", "blocks.{i}.self_attn.norm_k."),
    ("blocks.{i}.attn2.to_q.", "blocks.{i}.cross_attn.q."),
    ("blocks.{i}.attn2.to_k.", "blocks.{i}.cross_attn.k."),
    ("blocks.{i}.attn2.to_v.", "blocks.{i}.cross_attn.v."),
    ("blocks.{i}.attn2.to_out.0.", "blocks.{i}.cross_attn.o."),
    ("blocks.{i}.attn2.norm_q.", "blocks.{i}.cross_attn.norm_q."),
    ("blocks.{i}.attn2.norm_k.", "blocks.{i}.cross_attn.norm_k."),
    ("blocks.{i}.norm2.", "blocks.{i}.norm_cross."),
    ("blocks.{i}.ffn.net.0.proj.", "blocks.{i}.ffn.fc1."),
    ("blocks.{i}.ffn.net.2.", "blocks.{i}.ffn.fc2."),
    ("scale_shift_table", "head.modulation"),
    ("proj_out.", "head.proj."),
    # Wan2.1-I2V: the CLIP image embedder and the image K/V of each cross-attention
    ("condition_embedder.image_embedder.norm1.", "image_embed.norm1."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "image_embed.fc1."),
    ("condition_embedder.image_embedder.ff.net.2.", "image_embed.fc2."),
    ("condition_embedder.image_embedder.norm2.", "image_embed.norm2."),
    ("blocks.{i}.attn2.add_k_proj.", "blocks.{i}.cross_attn.add_k."),
    ("blocks.{i}.attn2.add_v_proj.", "blocks.{i}.cross_attn.add_v."),
    ("blocks.{i}.attn2.norm_added_k.", "blocks.{i}.cross_attn.norm_added_k."),
]
FLF2V_ERROR = ("Wan first-last-frame (FLF2V) transformers (pos_embed_seq_len: a position table over two images' "
               "CLIP tokens) are not supported yet; Wan T2V, TI2V and I2V are")


def rename(key: str, to_ours: bool) -> str | None:
    """Maps one state-dict key between diffusers' Wan names and ours (None if unknown)."""
    m = re.match(r"blocks\.(\d+)\.", key)
    i = m.group(1) if m else None
    for wan, ours in NAMES:
        src, dst = (wan, ours) if to_ours else (ours, wan)
        if "{i}" in src:
            if i is None:
                continue
            src, dst = src.format(i=i), dst.format(i=i)
        if src.endswith(".") and key.startswith(src):
            return dst + key[len(src):]
        if key == src:
            return dst
    return None


# Wan's original module names -> ours ("{i}" a block)
WAN_ORIGINAL = {
    "blocks.{i}.self_attn.q": "blocks.{i}.self_attn.q", "blocks.{i}.self_attn.k": "blocks.{i}.self_attn.k",
    "blocks.{i}.self_attn.v": "blocks.{i}.self_attn.v", "blocks.{i}.self_attn.o": "blocks.{i}.self_attn.o",
    "blocks.{i}.cross_attn.q": "blocks.{i}.cross_attn.q", "blocks.{i}.cross_attn.k": "blocks.{i}.cross_attn.k",
    "blocks.{i}.cross_attn.v": "blocks.{i}.cross_attn.v", "blocks.{i}.cross_attn.o": "blocks.{i}.cross_attn.o",
    "blocks.{i}.cross_attn.k_img": "blocks.{i}.cross_attn.add_k", "blocks.{i}.cross_attn.v_img": "blocks.{i}.cross_attn.add_v",
    "blocks.{i}.ffn.0": "blocks.{i}.ffn.fc1", "blocks.{i}.ffn.2": "blocks.{i}.ffn.fc2",
    "head.head": "head.proj", "time_projection.1": "time_proj",
    "text_embedding.0": "text_embed.fc1", "text_embedding.2": "text_embed.fc2",
    "time_embedding.0": "time_embed.fc1", "time_embedding.2": "time_embed.fc2",
    "img_emb.proj.1": "image_embed.fc1", "img_emb.proj.3": "image_embed.fc2",
}


def module_name(name: str, config) -> str | None:
    """Our module name of a LoRA's module name (teacher block indices): a diffusers
    WanTransformer3DModel name, Wan's original name (dots or kohya's underscores), or ours;
    None if none fits."""
    renamed = rename(name + ".", to_ours=True)
    if renamed is not None:
        return renamed[:-1]
    m = re.match(r"blocks[._](\d+)[._](.+)$", name)
    for original, ours in WAN_ORIGINAL.items():
        if "{i}" in original:
            tail = original.split("{i}.", 1)[1]
            if m and m.group(2) in (tail, tail.replace(".", "_")):
                return ours.format(i=m.group(1))
        elif name in (original, original.replace(".", "_")):
            return ours
    for ours in WAN_ORIGINAL.values():  # our own names
        if re.fullmatch(ours.replace(".", r"\.").replace("{i}", r"\d+"), name):
            return name
    return None


def owns_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    """Whether a diffusers state dict (without its config) is a Wan transformer's."""
    return "patch_embedding.weight" in sd and any(k.startswith("condition_embedder.") for k in sd)


def config_from_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None) -> dict:
    """Reads a diffusers Wan config off the shapes of its state dict (heads are not in the shapes)."""
    if "condition_embedder.image_embedder.pos_embed" in sd:
        raise ValueError(FLF2V_ERROR)
    w = sd["patch_embedding.weight"]  # (D, C, pt, ph, pw)
    dim = w.shape[0]
    num_heads = heads_of(dim, num_heads, "Wan")
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    return {
        "in_channels": w.shape[1],
        "patch_size": list(w.shape[2:]),
        "num_attention_heads": num_heads,
        "attention_head_dim": dim // num_heads,
        "out_channels": sd["proj_out.weight"].shape[0] // math.prod(w.shape[2:]),
        "ffn_dim": sd["blocks.0.ffn.net.0.proj.weight"].shape[0],
        "text_dim": sd["condition_embedder.text_embedder.linear_1.weight"].shape[1],
        "freq_dim": sd["condition_embedder.time_embedder.linear_1.weight"].shape[1],
        "num_layers": layers,
        "cross_attn_norm": "blocks.0.norm2.weight" in sd,
        **({"image_dim": sd["condition_embedder.image_embedder.norm1.weight"].shape[0], "added_kv_proj_dim": dim}
           if "condition_embedder.image_embedder.norm1.weight" in sd else {}),
    }


def model_config(cfg: dict) -> ModelConfig:
    """Our ModelConfig of a diffusers WanTransformer3DModel config."""
    if cfg.get("pos_embed_seq_len") is not None:
        raise ValueError(FLF2V_ERROR)
    image_dim, added_kv = cfg.get("image_dim"), cfg.get("added_kv_proj_dim")
    dim = int(cfg.get("num_attention_heads", 40)) * int(cfg.get("attention_head_dim", 128))
    if (image_dim is None) != (added_kv is None) or (added_kv is not None and added_kv != dim):
        raise ValueError(f"a Wan image-to-video transformer has image_dim and added_kv_proj_dim = its width {dim} "
                         f"together, got image_dim={image_dim!r} added_kv_proj_dim={added_kv!r}")
    qk = cfg.get("qk_norm", "rms_norm_across_heads")
    if qk != "rms_norm_across_heads":
        raise ValueError(f"unsupported Wan qk_norm {qk!r}; only 'rms_norm_across_heads' is supported")
    return ModelConfig(
        in_channels=int(cfg.get("in_channels", 16)),
        out_channels=int(cfg.get("out_channels") or cfg.get("in_channels", 16)),
        patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
        num_heads=int(cfg.get("num_attention_heads", 40)),
        head_dim=int(cfg.get("attention_head_dim", 128)),
        ffn_dim=int(cfg.get("ffn_dim", 13824)),
        text_dim=int(cfg.get("text_dim", 4096)),
        freq_dim=int(cfg.get("freq_dim", 256)),
        num_layers=int(cfg.get("num_layers", 40)),
        cross_attn_norm=bool(cfg.get("cross_attn_norm", True)),
        eps=float(cfg.get("eps", 1e-6)),
        rope_max_seq_len=int(cfg.get("rope_max_seq_len", 1024)),
        image_dim=None if image_dim is None else int(image_dim),
    )


def from_diffusers(cfg: dict, sd: dict[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, state dict of our DiT) of a Wan transformer's config and state dict."""
    config = model_config(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "condition_embedder.image_embedder.pos_embed":
            raise ValueError(FLF2V_ERROR)
        new = rename(key, to_ours=True)
        if new is None:
            raise ValueError(f"unrecognised key {key!r} in the Wan state dict")
        if new.endswith("modulation"):
            value = value.reshape(value.shape[-2], value.shape[-1])  # (1, k, D) -> (k, D)
        out[new] = value
    return config, out


def to_diffusers(model, out_dir: Path) -> Path:
    """Writes a DiT as a diffusers WanTransformer3DModel directory (see flgengine.convert)."""
    c: ModelConfig = model.config
    if c.pos_embed:
        raise ValueError("to_diffusers: this model has absolute position embeddings (pos_embed), which a diffusers "
                         "WanTransformer3DModel does not have")
    if c.velocity_skip:
        raise ValueError("to_diffusers: this model adds a skip c_skip(t) * x to its output (velocity_skip), "
                         "which a diffusers WanTransformer3DModel does not have")
    if c.x0_prediction:
        raise ValueError("to_diffusers: this model's network predicts x0 and converts it to a velocity (x0_prediction), "
                         "which a diffusers WanTransformer3DModel does not do")
    if c.pooled_text:
        raise ValueError("to_diffusers: this model adds a pooled text vector to its timestep embedding (pooled_text), "
                         "which a diffusers WanTransformer3DModel does not have")
    if not c.is_uniform:
        raise ValueError("to_diffusers: this student has per-block head counts or FFN widths, which a diffusers "
                         "WanTransformer3DModel cannot express; only block-pruned (uniform width) students convert")
    sd = {}
    for key, value in model.state_dict().items():
        new = rename(key, to_ours=False)
        if new is None:
            raise AssertionError(f"no diffusers name for {key!r}")  # a bug in the rename table
        if key.endswith("modulation"):
            value = value.unsqueeze(0)  # (k, D) -> (1, k, D)
        sd[new] = value
    config = {
        "_class_name": TRANSFORMER_CLASS,
        "_diffusers_version": "0.33.0",
        "patch_size": list(c.patch_size),
        "num_attention_heads": c.num_heads,
        "attention_head_dim": c.head_dim,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "text_dim": c.text_dim,
        "freq_dim": c.freq_dim,
        "ffn_dim": c.ffn_dim,
        "num_layers": len(c.kept_blocks),
        "cross_attn_norm": c.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": c.eps,
        "image_dim": c.image_dim,
        "added_kv_proj_dim": None if c.image_dim is None else c.dim,
        "rope_max_seq_len": c.rope_max_seq_len,
        "pos_embed_seq_len": None,
    }
    return write_diffusers_dir(out_dir, sd, config)


def bundle_from_diffusers(src: Path, out: Path, *, num_frames: int = 81, height: int = 480, width: int = 832,
                          steps: int = 50, guidance: float = 5.0, max_length: int = 512, image: str | None = None) -> Path:
    """A bundle of the Wan pipeline directory `src`: the sampler's shift from its scheduler
    config, else 5.0; video size and sampling defaults are the Wan2.1 T2V ones unless given.
    `image` (pipeline.json's scheme): None reads it off the pipeline: "concat" for a transformer
    that reads more channels than the VAE gives (Wan2.1-I2V, Wan2.2-I2V; with CLIP when it has
    image_dim, whose image_encoder/ and image_processor/ are copied), "first_frame" for a pipeline
    whose model_index.json sets expand_timesteps (Wan2.2-TI2V), else "none"."""
    config, model = pipeline_transformer(src, ("transformer", "text_encoder", "tokenizer", "vae"), "Wan", from_diffusers)
    shift = scheduler_shift(src, "flow_shift", 5.0)
    index = json.loads((src / "model_index.json").read_text()) if (src / "model_index.json").is_file() else {}
    z_dim = json.loads((src / "vae" / "config.json").read_text()).get("z_dim", 16) if (src / "vae" / "config.json").is_file() \
        else config.out_channels
    if image is None:
        image = "concat" if config.in_channels > z_dim else "first_frame" if index.get("expand_timesteps") else "none"
    parts = ["text_encoder", "tokenizer", "vae"]
    encoder = ImageEncoderConfig()
    if config.image_dim is not None:
        for sub in ("image_encoder", "image_processor"):
            if not (src / sub).is_dir():
                raise BundleError(f"{src}/{sub}: missing (the transformer reads CLIP image tokens, image_dim "
                                  f"{config.image_dim}: a Wan2.1-I2V pipeline holds image_encoder and image_processor)")
        parts += ["image_encoder", "image_processor"]
        encoder = ImageEncoderConfig(kind="clip", path="image_encoder", processor_path="image_processor")
    pipeline = PipelineConfig(
        text_encoder=TextEncoderConfig(kind="umt5", path="text_encoder", tokenizer_path="tokenizer", max_length=max_length),
        codec=CodecConfig(kind="wan_vae", path="vae"),
        sampler=SamplerConfig(kind="euler", num_steps=steps, shift=shift, guidance=guidance),
        num_frames=num_frames, height=height, width=width, fps=16, image=image, image_encoder=encoder,
    )
    with bundle_directory(out) as tmp:
        for sub in parts:
            shutil.copytree(src / sub, tmp / sub)
        write_bundle_files(tmp, model, pipeline, {"kind": "Wan teacher (converted from diffusers)", "source": str(src)})
    return Path(out)
