"""Bundles (one directory = one runnable model), atomic writes, and Wan conversion.

A bundle holds (DESIGN §4):
    config.json        ModelConfig
    model.safetensors  DiT weights (safetensors only, never pickle)
    pipeline.json      PipelineConfig: text encoder, codec, sampler, defaults
    provenance.json    where the weights came from (teacher hash, stages, metrics)

`load_bundle` validates everything before building the model and fails with one
`BundleError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TORCH_DTYPES, ConfigError, ModelConfig, PipelineConfig, torch_dtype

__all__ = [
    "BundleError",
    "Bundle",
    "save_bundle",
    "load_bundle",
    "read_model_config",
    "from_diffusers",
    "to_diffusers",
    "atomic_write_text",
    "atomic_save_safetensors",
    "file_sha256",
]

BUNDLE_FILES = ("config.json", "model.safetensors", "pipeline.json", "provenance.json")
# a two-expert bundle's low-noise DiT (pipeline.json's low_noise_boundary): config.json + model.safetensors
LOW_NOISE_DIR = "low_noise"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class BundleError(ValueError):
    """A bundle (or weights file) is missing, malformed or inconsistent."""


# ---- atomic writes ---------------------------------------------------------------------

def _atomic_replace(path: Path, write) -> None:
    """Writes through `write(tmp_path)` to a temp file beside `path`, fsyncs, renames."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a bundle is an ordinary readable file
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_replace(Path(path), lambda tmp: Path(tmp).write_text(text))


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_replace(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- safetensors validation --------------------------------------------------------------

def _check_safetensors_file(path: Path, where: str) -> dict[str, Any]:
    """Reads and checks a safetensors header without loading tensors; returns it.

    Refuses pickle / torch.save files outright and detects truncation.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)  # 8-byte header length, then the JSON header's "{"
        is_zip = head[:4] == b"PK\x03\x04"  # torch.save's zip format
        is_pickle = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") and head[8:9] != b"{"
        if is_zip or is_pickle:
            raise BundleError(f"{where}: is a pickle / torch.save file; flgengine loads safetensors only "
                              "(convert it with safetensors.torch.save_file)")
        if len(head) < 9:
            raise BundleError(f"{where}: truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head[:8])
        if n <= 0 or 8 + n > size:
            raise BundleError(f"{where}: truncated or not a safetensors file (header of {n} bytes, file of {size})")
        try:
            f.seek(8)
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BundleError(f"{where}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise BundleError(f"{where}: not a safetensors file (its header is not a JSON object)")
    data_size = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        end = info.get("data_offsets", [0, math.inf])[1] if isinstance(info, dict) else math.inf
        if end > data_size:
            raise BundleError(f"{where}: truncated: tensor {key!r} ends at byte {end} of a {data_size}-byte data section")
    return header


def _load_safetensors(path: Path, where: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _check_safetensors_file(path, where)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{where}: cannot read safetensors ({e})") from None


def _check_state_dict(sd: dict[str, torch.Tensor], expected: dict[str, torch.Size], where: str, source: str) -> None:
    missing = [k for k in expected if k not in sd]
    if missing:
        raise BundleError(f"{where}: missing tensor {missing[0]!r} (and {len(missing) - 1} more) required by {source}")
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise BundleError(f"{where}: unexpected tensor {unexpected[0]!r} (and {len(unexpected) - 1} more) not in {source}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise BundleError(f"{where}: tensor {k!r} has shape {tuple(sd[k].shape)} but {source} implies {tuple(shape)}")
        if not sd[k].is_floating_point():
            raise BundleError(f"{where}: tensor {k!r} has dtype {sd[k].dtype}, expected a floating point dtype")
        if not torch.isfinite(sd[k]).all():
            raise BundleError(f"{where}: tensor {k!r} contains NaN or Inf values")


# ---- bundles ----------------------------------------------------------------------------

@dataclass
class Bundle:
    """A loaded bundle: the DiT and the configs around it."""

    path: Path
    model: Any  # flgengine.model.DiT, or TwoExpertDiT for a two-expert bundle
    pipeline: PipelineConfig
    provenance: dict


INT8_SCALE = ".int8_scale"  # int8 storage: the key suffix of a weight's per-row scales


def quantize_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int8 storage of a state dict: each floating tensor of >= 2 dims becomes int8 rows with
    one fp32 scale per row (w ~ q * scale, scale = max|w| over the last dim / 127, under
    `key + INT8_SCALE`); other floating tensors are stored in float16."""
    out = {}
    for k, v in state.items():
        if v.is_floating_point() and v.dim() >= 2:
            w = v.detach().float()
            scale = w.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0  # (..., 1)
            out[k] = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
            out[k + INT8_SCALE] = scale
        else:
            out[k] = v.half() if v.is_floating_point() else v
    return out


def dequantize_int8(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The float32 weights of an int8-stored state dict (see quantize_int8); others unchanged."""
    for key in [k for k in state if k.endswith(INT8_SCALE)]:
        name, scale = key[:-len(INT8_SCALE)], state.pop(key)
        q = state.get(name)
        if q is None or q.dtype != torch.int8 or scale.shape != (*q.shape[:-1], 1):
            raise BundleError(f"{where}: int8 scales {key!r} do not match an int8 tensor {name!r} of rows "
                              f"{tuple(scale.shape[:-1])}")
        state[name] = q.float() * scale.float()
    return state


STORAGE_DTYPES = (*TORCH_DTYPES, "int8")  # names a bundle's weights can be stored in


def storage_dtype_of(name: str | None) -> torch.dtype | None:
    """A bundle's storage dtype by name: one of TORCH_DTYPES' names, or "int8" (quantize_int8)."""
    return None if name is None else torch.int8 if name == "int8" else torch_dtype(name)


def save_bundle(path: str | Path, model, pipeline: PipelineConfig | None = None, provenance: dict | None = None,
                storage_dtype: torch.dtype | None = None) -> Path:
    """Writes `model` (a DiT) as a bundle directory; each file is written atomically.

    `pipeline` defaults to a DiT-only pipeline (no text encoder or codec). The weights'
    sha256 and the writing flgengine version are added to the provenance.
    `storage_dtype` (e.g. torch.float16) rounds the stored weights to that dtype (half the
    file of fp32); torch.int8 stores the matrices as int8 with per-row scales (a quarter,
    see quantize_int8); loading casts them to the config's compute dtype as always.
    """
    from . import __version__

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pipeline = pipeline if pipeline is not None else PipelineConfig()
    state = model.state_dict()
    if storage_dtype == torch.int8:
        state = quantize_int8(state)
    elif storage_dtype is not None:
        state = {k: v.to(storage_dtype) if v.is_floating_point() else v for k, v in state.items()}
    atomic_save_safetensors(path / "model.safetensors", state, metadata={"format": "pt"})
    model.config.to_json(path / "config.json")
    pipeline.to_json(path / "pipeline.json")
    prov = dict(provenance or {})
    prov["weights_sha256"] = file_sha256(path / "model.safetensors")
    prov["num_params"] = sum(p.numel() for p in model.parameters())
    if storage_dtype is not None:
        prov["storage_dtype"] = str(storage_dtype).replace("torch.", "")
    prov.setdefault("flgengine_version", __version__)
    prov.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    atomic_write_text(path / "provenance.json", json.dumps(prov, indent=2) + "\n")
    return path


def read_json_object(path: Path) -> dict:
    """A JSON object from `path`, or a BundleError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return data


def read_model_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    try:
        return ModelConfig.from_json(path / "config.json")
    except ConfigError as e:
        raise BundleError(str(e)) from None


def load_bundle(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Bundle:
    """Loads and validates a bundle; returns a `Bundle` with the DiT in eval mode (a
    `TwoExpertDiT` when pipeline.json sets low_noise_boundary)."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: bundle directory does not exist")
    if not path.is_dir():
        raise BundleError(f"{path}: a bundle is a directory holding {', '.join(BUNDLE_FILES)}")
    for name in BUNDLE_FILES:
        if not (path / name).is_file():
            if name == "model.safetensors":
                pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
                if pickles:
                    raise BundleError(f"{path}/model.safetensors: missing; found pickle file {pickles[0]!r}, which "
                                      "flgengine refuses to load (save the weights with safetensors)")
            raise BundleError(f"{path}/{name}: missing (a bundle holds {', '.join(BUNDLE_FILES)})")

    config = read_model_config(path)
    try:
        pipeline = PipelineConfig.from_json(path / "pipeline.json")
    except ConfigError as e:
        raise BundleError(str(e)) from None
    provenance = read_json_object(path / "provenance.json")

    model = _load_dit(path, config, device, dtype)
    if pipeline.low_noise_boundary is not None:  # two experts: the low-noise DiT in low_noise/
        from .model import TwoExpertDiT

        low_dir = path / LOW_NOISE_DIR
        for name in ("config.json", "model.safetensors"):
            if not (low_dir / name).is_file():
                raise BundleError(f"{low_dir / name}: missing (pipeline.json sets low_noise_boundary "
                                  f"{pipeline.low_noise_boundary}: a two-expert bundle keeps its low-noise DiT there)")
        low = _load_dit(low_dir, read_model_config(low_dir), device, dtype)
        try:
            model = TwoExpertDiT(model, low, pipeline.low_noise_boundary)
        except ValueError as e:
            raise BundleError(f"{path}: {e}") from None
    return Bundle(path=path, model=model.eval().requires_grad_(False), pipeline=pipeline, provenance=provenance)


def _load_dit(path: Path, config: ModelConfig, device, dtype):
    """The DiT of `path`/model.safetensors, checked against `config`, cast and moved."""
    from .model import DiT

    where = f"{path}/model.safetensors"
    state = dequantize_int8(_load_safetensors(path / "model.safetensors", where), where)
    with torch.device("meta"):
        model = DiT(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _check_state_dict(state, expected, where, "config.json")
    model.load_state_dict(state, assign=True)
    model.cast(dtype if dtype is not None else torch_dtype(config.dtype))
    if device is not None:
        model.to(device)
    return model


# ---- Wan (diffusers) conversion -------------------------------------------------------------

# (diffusers WanTransformer3DModel name, our DiT name); "{i}" is a block index. A name
# ending in "." is a module prefix (weight/bias follow), any other is a whole key.
_WAN_NAMES = [
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
]
_I2V_MARKERS = ("image_embedder", "add_k_proj", "add_v_proj", "norm_added_k", "norm_added_q")
I2V_ERROR = ("Wan image-to-video (I2V/FLF2V) transformers (image_dim / added_kv_proj_dim, CLIP image tokens) are "
             "not supported yet; Wan T2V and TI2V (per-token timesteps) are")


def _rename(key: str, to_ours: bool) -> str | None:
    """Maps one state-dict key between diffusers' Wan names and ours (None if unknown)."""
    m = re.match(r"blocks\.(\d+)\.", key)
    i = m.group(1) if m else None
    for wan, ours in _WAN_NAMES:
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


def _config_from_wan(cfg: dict) -> ModelConfig:
    if cfg.get("image_dim") is not None or cfg.get("added_kv_proj_dim") is not None:
        raise ValueError(I2V_ERROR)
    if cfg.get("pos_embed_seq_len") is not None:
        raise ValueError("Wan FLF2V transformers (pos_embed_seq_len) are not supported yet")
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
    )


def _infer_wan_config(sd: dict[str, torch.Tensor], num_heads: int | None) -> dict:
    """Reads a diffusers Wan config off the shapes of its state dict (heads are not in the shapes)."""
    w = sd["patch_embedding.weight"]  # (D, C, pt, ph, pw)
    dim = w.shape[0]
    if num_heads is None:
        if dim % 128:
            raise ValueError(f"cannot infer num_heads for width {dim}: pass num_heads= (Wan uses head_dim 128)")
        num_heads = dim // 128
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
    }


def _read_diffusers_dir(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if (path / "transformer" / "config.json").is_file():  # a whole pipeline directory
        path = path / "transformer"
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: not a diffusers WanTransformer3DModel directory (no config.json)")
    cfg = json.loads(cfg_file.read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f"; found pickle file {pickles[0]!r}, which flgengine refuses to load" if pickles else ""
        raise BundleError(f"{path}: no .safetensors weights{hint}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(_load_safetensors(f, str(f)))
    return cfg, sd


def from_diffusers(source, *, num_heads: int | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Converts a diffusers `WanTransformer3DModel` to (ModelConfig, state dict of our DiT).

    `source`: a WanTransformer3DModel instance, a directory (the transformer folder or a
    whole Wan pipeline folder), or a diffusers state dict (`num_heads` then names the
    head count, else width / 128). I2V transformers are refused with a clear error.
    """
    if isinstance(source, (str, Path)):
        cfg, sd = _read_diffusers_dir(Path(source))
    elif isinstance(source, dict):
        sd = source
        if any(m in k for k in sd for m in _I2V_MARKERS):
            raise ValueError(I2V_ERROR)
        cfg = _infer_wan_config(sd, num_heads)
    elif hasattr(source, "state_dict") and hasattr(source, "config"):
        cfg, sd = dict(source.config), source.state_dict()
    else:
        raise TypeError(f"from_diffusers takes a WanTransformer3DModel, a directory or a state dict, got {type(source).__name__}")
    if cfg.get("_class_name", "WanTransformer3DModel") != "WanTransformer3DModel":
        raise ValueError(f"expected a WanTransformer3DModel, got {cfg['_class_name']!r}")
    config = _config_from_wan(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if any(m in key for m in _I2V_MARKERS):
            raise ValueError(I2V_ERROR)
        new = _rename(key, to_ours=True)
        if new is None:
            raise ValueError(f"unrecognised key {key!r} in the Wan state dict")
        if new.endswith("modulation"):
            value = value.reshape(value.shape[-2], value.shape[-1])  # (1, k, D) -> (k, D)
        out[new] = value
    return config, out


def to_diffusers(model_or_bundle, out_dir: str | Path) -> Path:
    """Writes a DiT (or a bundle path) as a diffusers `WanTransformer3DModel` directory.

    A block-pruned student becomes a Wan transformer with fewer `num_layers`; students
    with per-block widths have no diffusers equivalent and are refused.
    """
    model = load_bundle(model_or_bundle).model if isinstance(model_or_bundle, (str, Path)) else model_or_bundle
    if hasattr(model, "experts"):
        raise ValueError("to_diffusers: this model has two experts (high / low noise); convert each DiT on its own "
                         "(model.high, model.low): one WanTransformer3DModel each, as Wan2.2's transformer and transformer_2")
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
        new = _rename(key, to_ours=False)
        if new is None:
            raise AssertionError(f"no diffusers name for {key!r}")  # a bug in the rename table
        if key.endswith("modulation"):
            value = value.unsqueeze(0)  # (k, D) -> (1, k, D)
        sd[new] = value
    config = {
        "_class_name": "WanTransformer3DModel",
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
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": c.rope_max_seq_len,
        "pos_embed_seq_len": None,
    }
    out_dir = Path(out_dir)
    atomic_save_safetensors(out_dir / "diffusion_pytorch_model.safetensors", sd, metadata={"format": "pt"})
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return out_dir
