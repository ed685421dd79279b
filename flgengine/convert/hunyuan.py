"""HunyuanVideo (diffusers `HunyuanVideoTransformer3DModel`) <-> our HunyuanVideoDiT.

A renaming of the state dict plus a mapping of the config; `bundle_from_diffusers` also copies
the Llama and CLIP-L text encoders, their tokenizers and the VAE. Our `blocks` list holds both
kinds (dual-stream first); diffusers keeps them apart (`transformer_blocks`,
`single_transformer_blocks`), so a pruned student converts to a transformer with fewer
layers of each kind. The image-to-video transformers (`image_condition_type` "latent_concat",
"token_replace") convert as models; their pipelines (a LLaVA text encoder that reads the image)
are not made into bundles.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from ..bundle import bundle_directory, write_bundle_files
from ..config import CodecConfig, PipelineConfig, SamplerConfig, TextEncoderConfig
from ..model.hunyuan import HunyuanVideoConfig
from ..model.hunyuan_config import IMAGE_CONDITIONS
from .source import heads_of, pipeline_transformer, scheduler_shift, write_diffusers_dir

TRANSFORMER_CLASS = "HunyuanVideoTransformer3DModel"
PIPELINE_CLASSES = ("HunyuanVideoPipeline",)

# (diffusers name, our name): module prefixes. "{r}" a refiner block, "{d}" a dual-stream
# block (diffusers transformer_blocks), "{s}" a single-stream block (single_transformer_blocks).
NAMES = [
    ("x_embedder.proj.", "patch_embed."),
    ("time_text_embed.timestep_embedder.linear_1.", "time_embed.fc1."),
    ("time_text_embed.timestep_embedder.linear_2.", "time_embed.fc2."),
    ("time_text_embed.guidance_embedder.linear_1.", "guidance_embed.fc1."),
    ("time_text_embed.guidance_embedder.linear_2.", "guidance_embed.fc2."),
    ("time_text_embed.text_embedder.linear_1.", "pooled_embed.fc1."),
    ("time_text_embed.text_embedder.linear_2.", "pooled_embed.fc2."),
    ("context_embedder.time_text_embed.timestep_embedder.linear_1.", "text_refiner.time_embed.fc1."),
    ("context_embedder.time_text_embed.timestep_embedder.linear_2.", "text_refiner.time_embed.fc2."),
    ("context_embedder.time_text_embed.text_embedder.linear_1.", "text_refiner.pooled_embed.fc1."),
    ("context_embedder.time_text_embed.text_embedder.linear_2.", "text_refiner.pooled_embed.fc2."),
    ("context_embedder.proj_in.", "text_refiner.proj_in."),
    ("context_embedder.token_refiner.refiner_blocks.{r}.norm1.", "text_refiner.blocks.{r}.norm1."),
    ("context_embedder.token_refiner.refiner_blocks.{r}.attn.to_q.", "text_refiner.blocks.{r}.q."),
    ("context_embedder.token_refiner.refiner_blocks.{r}.attn.to_k.", "text_refiner.blocks.{r}.k."),
    ("context_embedder.token_refiner.refiner_blocks.{r}.attn.to_v.", "text_refiner.blocks.{r}.v."),
    ("context_embedder.token_refiner.refiner_blocks.{r}.attn.to_out.0.", "text_refiner.blocks.{r}.o."),
    ("context_embedder.token_refiner.refiner_blocks.{r}.norm2.", "text_refiner.blocks.{r}.norm2."),
    ("context_embedder.token_refiner.refiner_blocks.{r}.ff.net.0.proj.", "text_refiner.blocks.{r}.mlp.fc1."),
    ("context_embedder.token_refiner.refiner_blocks.{r}.ff.net.2.", "text_refiner.blocks.{r}.mlp.fc2."),
    ("context_embedder.token_refiner.refiner_blocks.{r}.norm_out.linear.", "text_refiner.blocks.{r}.gate."),
    ("transformer_blocks.{d}.norm1.linear.", "blocks.{d}.mod_x."),
    ("transformer_blocks.{d}.norm1_context.linear.", "blocks.{d}.mod_c."),
    ("transformer_blocks.{d}.attn.to_q.", "blocks.{d}.attn.q."),
    ("transformer_blocks.{d}.attn.to_k.", "blocks.{d}.attn.k."),
    ("transformer_blocks.{d}.attn.to_v.", "blocks.{d}.attn.v."),
    ("transformer_blocks.{d}.attn.norm_q.", "blocks.{d}.attn.norm_q."),
    ("transformer_blocks.{d}.attn.norm_k.", "blocks.{d}.attn.norm_k."),
    ("transformer_blocks.{d}.attn.add_q_proj.", "blocks.{d}.attn.add_q."),
    ("transformer_blocks.{d}.attn.add_k_proj.", "blocks.{d}.attn.add_k."),
    ("transformer_blocks.{d}.attn.add_v_proj.", "blocks.{d}.attn.add_v."),
    ("transformer_blocks.{d}.attn.norm_added_q.", "blocks.{d}.attn.norm_added_q."),
    ("transformer_blocks.{d}.attn.norm_added_k.", "blocks.{d}.attn.norm_added_k."),
    ("transformer_blocks.{d}.attn.to_out.0.", "blocks.{d}.o."),
    ("transformer_blocks.{d}.attn.to_add_out.", "blocks.{d}.add_o."),
    ("transformer_blocks.{d}.ff.net.0.proj.", "blocks.{d}.ffn_x.fc1."),
    ("transformer_blocks.{d}.ff.net.2.", "blocks.{d}.ffn_x.fc2."),
    ("transformer_blocks.{d}.ff_context.net.0.proj.", "blocks.{d}.ffn_c.fc1."),
    ("transformer_blocks.{d}.ff_context.net.2.", "blocks.{d}.ffn_c.fc2."),
    ("single_transformer_blocks.{s}.norm.linear.", "blocks.{s}.mod."),
    ("single_transformer_blocks.{s}.attn.to_q.", "blocks.{s}.attn.q."),
    ("single_transformer_blocks.{s}.attn.to_k.", "blocks.{s}.attn.k."),
    ("single_transformer_blocks.{s}.attn.to_v.", "blocks.{s}.attn.v."),
    ("single_transformer_blocks.{s}.attn.norm_q.", "blocks.{s}.attn.norm_q."),
    ("single_transformer_blocks.{s}.attn.norm_k.", "blocks.{s}.attn.norm_k."),
    ("single_transformer_blocks.{s}.proj_mlp.", "blocks.{s}.fc_mlp."),
    ("single_transformer_blocks.{s}.proj_out.", "blocks.{s}.proj_out."),
    ("norm_out.linear.", "head_mod."),
    ("proj_out.", "head."),
]
SLOTS = ("{r}", "{d}", "{s}")


def rename(key: str, to_ours: bool, num_dual: int) -> str | None:
    """Maps one state-dict key between diffusers' HunyuanVideo names and ours (None if unknown).
    `num_dual`: the model's dual-stream blocks; ours are blocks 0..num_dual-1, and our
    blocks.{num_dual + s} is diffusers' single_transformer_blocks.{s}."""
    for theirs, ours in NAMES:
        src, dst = (theirs, ours) if to_ours else (ours, theirs)
        slot = next((s for s in SLOTS if s in src), None)
        if slot is None:
            if key.startswith(src):
                return dst + key[len(src):]
            continue
        head, tail = src.split(slot)
        m = re.match(re.escape(head) + r"(\d+)" + re.escape(tail), key)
        if not m:
            continue
        i = int(m.group(1))
        if slot == "{d}" and not to_ours and i >= num_dual:
            continue  # our single-stream block: a later entry
        if slot == "{s}":
            if to_ours:
                i += num_dual
            elif i < num_dual:
                continue  # our dual-stream block
            else:
                i -= num_dual
        return dst.replace(slot, str(i)) + key[m.end():]
    return None


def module_name(name: str, config) -> str | None:
    """Our module name (teacher block indices) of a diffusers HunyuanVideoTransformer3DModel
    module name (LoRA keys), or None."""
    renamed = rename(name + ".", to_ours=True, num_dual=config.num_layers)
    return None if renamed is None else renamed[:-1]


def owns_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    """Whether a diffusers state dict (without its config) is a HunyuanVideo transformer's."""
    return "x_embedder.proj.weight" in sd and any(k.startswith("context_embedder.token_refiner.") for k in sd)


def _count(sd: dict, prefix: str) -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return 1 + max(ids) if ids else 0


def config_from_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None) -> dict:
    """A diffusers HunyuanVideo config read off the shapes of its state dict (heads are not in the
    shapes: `num_heads`, else width / 128)."""
    w = sd["x_embedder.proj.weight"]  # (D, C, pt, p, p)
    dim = w.shape[0]
    num_heads = heads_of(dim, num_heads, "HunyuanVideo")
    if dim // num_heads != 128:
        raise ValueError(f"a bare HunyuanVideo state dict of head dim {dim // num_heads}: its RoPE split "
                         "(rope_axes_dim) is not in the weights; convert from the diffusers directory or model instead")
    mlp = sd.get("transformer_blocks.0.ff.net.0.proj.weight", sd.get("single_transformer_blocks.0.proj_mlp.weight"))
    return {
        "in_channels": w.shape[1], "out_channels": sd["proj_out.weight"].shape[0] // (w.shape[2] * w.shape[3] * w.shape[4]),
        "num_attention_heads": num_heads, "attention_head_dim": dim // num_heads,
        "num_layers": _count(sd, "transformer_blocks."), "num_single_layers": _count(sd, "single_transformer_blocks."),
        "num_refiner_layers": _count(sd, "context_embedder.token_refiner.refiner_blocks."),
        "mlp_ratio": mlp.shape[0] / dim, "patch_size": w.shape[3], "patch_size_t": w.shape[2],
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in sd,
        "text_embed_dim": sd["context_embedder.proj_in.weight"].shape[1],
        "pooled_projection_dim": sd["time_text_embed.text_embedder.linear_1.weight"].shape[1],
    }


def model_config(cfg: dict) -> HunyuanVideoConfig:
    """Our HunyuanVideoConfig of a diffusers HunyuanVideoTransformer3DModel config."""
    kind = cfg.get("image_condition_type")
    if kind not in IMAGE_CONDITIONS:
        raise ValueError(f"unsupported HunyuanVideo image_condition_type {kind!r}; supported: "
                         f"{', '.join(map(repr, IMAGE_CONDITIONS))}")
    qk = cfg.get("qk_norm", "rms_norm")
    if qk != "rms_norm":
        raise ValueError(f"unsupported HunyuanVideo qk_norm {qk!r}; only 'rms_norm' is supported")
    p, pt = int(cfg.get("patch_size", 2)), int(cfg.get("patch_size_t", 1))
    heads, head_dim = int(cfg.get("num_attention_heads", 24)), int(cfg.get("attention_head_dim", 128))
    return HunyuanVideoConfig(
        in_channels=int(cfg.get("in_channels", 16)), out_channels=int(cfg.get("out_channels") or cfg.get("in_channels", 16)),
        num_heads=heads, head_dim=head_dim, num_layers=int(cfg.get("num_layers", 20)),
        num_single_layers=int(cfg.get("num_single_layers", 40)), num_refiner_layers=int(cfg.get("num_refiner_layers", 2)),
        mlp_ratio=float(cfg.get("mlp_ratio", 4.0)), patch_size=(pt, p, p),
        text_dim=int(cfg.get("text_embed_dim", 4096)), pooled_dim=int(cfg.get("pooled_projection_dim", 768)),
        guidance_embed=bool(cfg.get("guidance_embeds", True)), rope_theta=float(cfg.get("rope_theta", 256.0)),
        rope_axes=tuple(int(n) for n in cfg.get("rope_axes_dim", (16, 56, 56))), image_condition=kind,
    )


def from_diffusers(cfg: dict, sd: dict[str, torch.Tensor]) -> tuple[HunyuanVideoConfig, dict[str, torch.Tensor]]:
    """(HunyuanVideoConfig, state dict of our HunyuanVideoDiT) of a diffusers transformer."""
    config = model_config(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = rename(key, to_ours=True, num_dual=config.num_layers)
        if new is None:
            raise ValueError(f"unrecognised key {key!r} in the HunyuanVideo state dict")
        out[new] = value
    return config, out


def to_diffusers(model, out_dir: Path) -> Path:
    """Writes a HunyuanVideoDiT as a diffusers HunyuanVideoTransformer3DModel directory; a pruned
    student becomes one with the dual- and single-stream blocks it kept."""
    c: HunyuanVideoConfig = model.config
    kept = c.kept_blocks
    num_dual = sum(c.kind_of(i) == "dual" for i in kept)
    sd = {}
    for key, value in model.state_dict().items():
        new = rename(key, to_ours=False, num_dual=num_dual)
        if new is None:
            raise AssertionError(f"no diffusers name for {key!r}")  # a bug in the rename table
        sd[new] = value
    config = {
        "_class_name": TRANSFORMER_CLASS, "_diffusers_version": "0.33.0",
        "in_channels": c.in_channels, "out_channels": c.out_channels,
        "num_attention_heads": c.num_heads, "attention_head_dim": c.head_dim,
        "num_layers": num_dual, "num_single_layers": len(kept) - num_dual, "num_refiner_layers": c.num_refiner_layers,
        "mlp_ratio": c.mlp_ratio, "patch_size": c.patch_size[1], "patch_size_t": c.patch_size[0], "qk_norm": "rms_norm",
        "guidance_embeds": c.guidance_embed, "text_embed_dim": c.text_dim, "pooled_projection_dim": c.pooled_dim,
        "rope_theta": c.rope_theta, "rope_axes_dim": list(c.rope_axes),
        "image_condition_type": c.image_condition,
    }
    return write_diffusers_dir(out_dir, sd, config)


def bundle_from_diffusers(src: Path, out: Path, *, num_frames: int = 129, height: int = 720, width: int = 1280,
                          steps: int = 50, guidance: float = 6.0, max_length: int = 256, image: str | None = None) -> Path:
    """A bundle of the HunyuanVideo pipeline directory `src`: the transformer converted, the
    Llama and CLIP-L text encoders, their tokenizers and the VAE copied. `guidance`: the
    embedded guidance scale of a guidance-distilled transformer (sampled without CFG), else the
    CFG scale. The sampler's shift comes from the scheduler config (else 7.0); the defaults are
    HunyuanVideo's (129 frames of 720x1280 at 24 fps, 50 steps, guidance 6, 256 prompt tokens)."""
    if image not in (None, "none"):
        raise ValueError(f"image {image!r}: HunyuanVideo image-to-video pipelines are not supported yet")
    parts = ("transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae")
    config, model = pipeline_transformer(src, parts, "HunyuanVideo", from_diffusers)
    if config.image_condition is not None:
        raise ValueError(f"{src}/transformer is a HunyuanVideo image-to-video transformer (image_condition_type "
                         f"{config.image_condition!r}): its pipeline (a LLaVA text encoder that reads the image) is not "
                         "supported as a bundle; convert the transformer alone with flgengine.convert.from_diffusers")
    shift = scheduler_shift(src, "shift", 7.0)
    embedded = guidance if config.guidance_embed else None
    pipeline = PipelineConfig(
        text_encoder=TextEncoderConfig(kind="hunyuan", path="text_encoder", tokenizer_path="tokenizer",
                                       clip_path="text_encoder_2", clip_tokenizer_path="tokenizer_2", max_length=max_length),
        codec=CodecConfig(kind="hunyuan_vae", path="vae"),
        sampler=SamplerConfig(kind="euler", num_steps=steps, shift=shift, guidance=1.0 if embedded is not None else guidance,
                              embedded_guidance=embedded),
        num_frames=num_frames, height=height, width=width, fps=24)
    with bundle_directory(out) as tmp:
        for sub in parts[1:]:
            shutil.copytree(src / sub, tmp / sub)
        write_bundle_files(tmp, model, pipeline, {"kind": "HunyuanVideo teacher (converted from diffusers)", "source": str(src)})
    return Path(out)
