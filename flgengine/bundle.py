"""Bundles: one directory = one runnable model.

A bundle holds
    config.json        the model config (ModelConfig; another family's names it: "family")
    model.safetensors  DiT weights (safetensors only, never pickle)
    pipeline.json      PipelineConfig: text encoder, codec, sampler, defaults
    provenance.json    where the weights came from (teacher hash, stages, metrics)
and, for a two-expert model, low_noise/ with the low-noise DiT's config.json and
model.safetensors.

`load_bundle` validates everything before building the model and fails with one
`BundleError` naming the file and the key. The file helpers of `flgengine.files`
(atomic writes, checked safetensors reading) are re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import ConfigError, PipelineConfig, torch_dtype
from .files import (PICKLE_SUFFIXES, BundleError, atomic_replace, atomic_save_safetensors, atomic_write_text,
                    check_replaceable, check_safetensors_file, check_state_dict, file_sha256, load_safetensors,
                    replace_directory, staged_directory)
from . import files
from .model import TwoExpertDiT, build, model_config_from_json
from .model.precision import PRECISIONS, check_fp8_state, dequantize_state, fp8_weight_keys, quantize_state, to_fp8
from .storage import (INT4_GROUP, INT4_SCALE, INT8_SCALE, STORAGE_DTYPES, check_int4_group, dequantize_stored,
                      quantize_int4, quantize_int8, storage_dtype_of, storage_name, store_state)
from .version import __version__

__all__ = [  # bundles, and the file helpers of flgengine.files re-exported
    "Bundle", "BUNDLE_FILES", "LOW_NOISE_DIR", "STORAGE_DTYPES", "INT8_SCALE", "INT4_SCALE", "save_bundle",
    "bundle_directory", "write_bundle_files", "store_bundle", "part_dirs", "copy_parts", "load_bundle", "read_model_config", "read_json_object",
    "read_provenance", "storage_dtype_of", "quantize_int8", "quantize_int4", "dequantize_stored", *files.__all__,
]

BUNDLE_FILES = ("config.json", "model.safetensors", "pipeline.json", "provenance.json")
# a two-expert bundle's low-noise DiT (pipeline.json's low_noise_boundary): config.json + model.safetensors
LOW_NOISE_DIR = "low_noise"
META_FROM = 50_000_000  # parameters from which _load_dit builds the DiT on the meta device


@dataclass
class Bundle:
    """A loaded bundle: the DiT and the configs around it."""

    path: Path
    model: Any  # flgengine.model.DiT, or TwoExpertDiT for a two-expert bundle
    pipeline: PipelineConfig
    provenance: dict
    lora: Any = None  # flgengine.lora.LoraReport of the LoRAs loaded with it, or None


# ---- save / load -------------------------------------------------------------------------

@contextlib.contextmanager
def bundle_directory(path: str | Path, check: bool = True) -> Iterator[Path]:
    """Yields a fresh directory to write a whole bundle into; it replaces `path` when the block
    ends without an exception (files.staged_directory: a kill or a full disk at any moment
    leaves the previous bundle or none, never a mix). `path` must be absent, empty or a bundle
    (`check=False`: the caller has checked). A failed write is a BundleError saying the
    previous bundle is unchanged."""
    path = Path(path)
    if check:
        check_replaceable(path, "config.json", "a bundle")
    try:
        with staged_directory(path) as tmp:
            yield tmp
    except OSError as e:
        before = "the previous bundle is unchanged" if (path / "config.json").is_file() else "nothing was written"
        raise BundleError(f"{path}: writing the bundle failed ({e.strerror or e}); {before}") from e


def save_bundle(path: str | Path, model, pipeline: PipelineConfig | None = None, provenance: dict | None = None,
                storage_dtype: torch.dtype | None = None) -> Path:
    """Writes `model` (a DiT) as the bundle directory `path`, whole (bundle_directory): the
    bundle files there before are replaced; the parts `pipeline` names (a text encoder, a codec,
    already in `path`) and a low_noise/ expert are kept (hard-linked into the new directory, or
    copied across file systems). `path` may hold nothing else. To write parts too, use
    `bundle_directory(path)` with `write_bundle_files` and the parts' own writers."""
    path = Path(path)
    parts = {*part_dirs(pipeline or PipelineConfig()), LOW_NOISE_DIR}
    if path.is_dir() and not path.is_symlink():
        other = sorted(p.name for p in path.iterdir() if p.name not in (*BUNDLE_FILES, *parts))
        if other:
            raise BundleError(f"{path} holds {other[0]!r}, which is neither a bundle file nor a part its pipeline.json "
                              "names; refusing to replace it (choose another path or empty it)")
    else:
        check_replaceable(path, "config.json", "a bundle")
    with bundle_directory(path, check=False) as tmp:
        for name in parts:
            if (path / name).is_dir() and not (path / name).is_symlink():
                shutil.copytree(path / name, tmp / name, symlinks=True, copy_function=_link_or_copy)
            elif (path / name).exists() or (path / name).is_symlink():
                _link_or_copy(path / name, tmp / name)
        write_bundle_files(tmp, model, pipeline, provenance, storage_dtype)
    return path


def part_dirs(pipeline: PipelineConfig) -> list[str]:
    """The top-level entries of a bundle that its pipeline's parts live in (text_encoder, vae, ...)."""
    return sorted({Path(v).parts[0] for _, v in pipeline.part_paths() if not Path(v).is_absolute()})


def copy_parts(pipeline: PipelineConfig, src: str | Path, dst: str | Path) -> None:
    """Copies the parts `pipeline` names (part_dirs) from the bundle directory `src` into `dst`."""
    for name in part_dirs(pipeline):
        if (Path(src) / name).is_dir():
            shutil.copytree(Path(src) / name, Path(dst) / name)
        elif (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def _link_or_copy(src, dst) -> None:
    """A hard link of `src` at `dst` (the same bytes, no copy), else a copy."""
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_bundle_files(path: str | Path, model, pipeline: PipelineConfig | None = None, provenance: dict | None = None,
                       storage_dtype: torch.dtype | None = None, int4_group: int = INT4_GROUP) -> Path:
    """Writes `model` (a DiT) as model.safetensors, config.json, pipeline.json and
    provenance.json into the directory `path` (a bundle_directory; see save_bundle).

    `pipeline` defaults to a DiT-only pipeline (no text encoder or codec). The weights'
    sha256 and the writing flgengine version are added to the provenance.
    `storage_dtype` (e.g. torch.float16) rounds the stored weights to that dtype (half the
    file of fp32); torch.int8 stores the matrices as int8 with per-row scales (a quarter),
    torch.int4 the linear weights as 4-bit groups of `int4_group` (flgengine/storage.py); loading casts them
    to the config's compute dtype as always.
    torch.float8_e4m3fn stores the block linears in e4m3 with per-output-channel fp32 scales
    (the other tensors as they are): `load_bundle(..., precision="fp8")` keeps them e4m3, and
    any other precision dequantises them. An FP8 model (precision "fp8") saves this way anyway.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pipeline = pipeline if pipeline is not None else PipelineConfig()
    state = store_state(model.state_dict(), storage_dtype, int4_group, fp8_weight_keys(model))
    atomic_save_safetensors(path / "model.safetensors", state, metadata={"format": "pt"})
    model.config.to_json(path / "config.json")
    pipeline.to_json(path / "pipeline.json")
    prov = dict(provenance or {})
    prov["weights_sha256"] = file_sha256(path / "model.safetensors")
    prov["num_params"] = sum(p.numel() for p in model.parameters())
    if storage_dtype is not None:
        prov["storage_dtype"] = storage_name(storage_dtype)
    prov.setdefault("flgengine_version", __version__)
    prov.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    atomic_write_text(path / "provenance.json", json.dumps(prov, indent=2) + "\n")
    return path


def store_bundle(src: str | Path, dst: str | Path, storage_dtype: torch.dtype, int4_group: int = INT4_GROUP) -> Path:
    """A copy of the bundle `src` at `dst` with its DiT weights (both experts of a two-expert
    bundle) stored in `storage_dtype` (flgengine/storage.py); the pipeline's parts (text
    encoder, codec, image encoder) are copied as they are. The weights are read in float32
    (dequantised) and stored anew (int4: `int4_group` weights per scale). provenance.json records a "store" stage naming what was
    stored before; an "evaluation" it held measured those weights, so it moves to
    "evaluation_before_store" (measure the new ones: `distill evaluate --write-provenance`)."""
    src, dst = Path(src), Path(dst)
    check_int4_group(int4_group)  # before the weights are read
    if src.resolve() == dst.resolve():
        raise ValueError(f"store writes a new bundle: the output {dst} is the source")
    bundle = load_bundle(src, device="cpu", dtype=torch.float32)
    experts = (bundle.model.high, bundle.model.low) if isinstance(bundle.model, TwoExpertDiT) else (bundle.model,)

    def stored_provenance(prov: dict, weights: Path) -> dict:
        prov = dict(prov)
        stage = {"stage": "store", "storage_dtype": storage_name(storage_dtype),
                 "from_storage_dtype": prov.get("storage_dtype", "float32"), "from_weights_sha256": file_sha256(weights),
                 **({"int4_scales": "least-squares clip", "int4_group": int4_group}  # earlier: max |w|
                    if storage_dtype == torch.int4 else {})}
        for key in ("weights_sha256", "num_params", "storage_dtype", "created", "flgengine_version"):
            prov.pop(key, None)  # write_bundle_files writes them anew
        if "evaluation" in prov:
            prov["evaluation_before_store"] = prov.pop("evaluation")
        prov["stages"] = [*prov.get("stages", []), stage]
        return prov

    with bundle_directory(dst) as tmp:
        copy_parts(bundle.pipeline, src, tmp)
        if len(experts) == 2:
            low = src / LOW_NOISE_DIR
            write_bundle_files(tmp / LOW_NOISE_DIR, experts[1], None,
                               stored_provenance(read_provenance(low), low / "model.safetensors"), storage_dtype, int4_group)
        write_bundle_files(tmp, experts[0], bundle.pipeline, stored_provenance(bundle.provenance, src / "model.safetensors"),
                           storage_dtype, int4_group)
    return dst


def read_json_object(path: str | Path) -> dict:
    """A JSON object from `path`, or a BundleError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return data


# provenance.json is informational (nothing in it changes what the model computes), but typed:
# the keys flgengine writes have these types; other keys (a tool's own records) may hold any
# JSON; no number anywhere may be NaN or infinite
_SHA256 = "a sha256 hex digest (64 characters 0-9a-f)"
PROVENANCE_KEYS: dict[str, tuple[str, Any]] = {
    "kind": ("a string", lambda v: isinstance(v, str)),
    "weights_sha256": (_SHA256, lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)),
    "num_params": ("an integer >= 0", lambda v: type(v) is int and v >= 0),
    "num_params_low_noise": ("an integer >= 0", lambda v: type(v) is int and v >= 0),
    # (earlier writers named fp8 storage "float8_e4m3fn")
    "storage_dtype": ("one of " + ", ".join(STORAGE_DTYPES), lambda v: v in (*STORAGE_DTYPES, "float8_e4m3fn")),
    "flgengine_version": ("a string", lambda v: isinstance(v, str)),
    "created": ("a string (UTC time, YYYY-MM-DDTHH:MM:SSZ)", lambda v: isinstance(v, str)),
    "stages": ("a list of objects", lambda v: isinstance(v, list) and all(isinstance(s, dict) for s in v)),
    "evaluation": ("an object", lambda v: isinstance(v, dict)),
    "evaluation_fp8": ("an object", lambda v: isinstance(v, dict)),
    "train_seconds_total": ("a number >= 0", lambda v: type(v) in (int, float) and v >= 0),
    "teacher": ("a string or an object", lambda v: isinstance(v, (str, dict))),
}


def read_provenance(path: str | Path) -> dict:
    """provenance.json of the bundle directory `path`, typed (PROVENANCE_KEYS), or a BundleError
    naming the file, the key, the value and what was expected."""
    where = Path(path) / "provenance.json"
    data = read_json_object(where)
    for key, (expected, ok) in PROVENANCE_KEYS.items():
        if key in data and not ok(data[key]):
            raise BundleError(f"{where}: {key} must be {expected}, got {data[key]!r}")
    bad = _non_finite(data, "")
    if bad:
        raise BundleError(f"{where}: {bad[0]} is {bad[1]!r}; numbers must be finite")
    return data


def _non_finite(value, key: str) -> tuple[str, float] | None:
    if isinstance(value, float) and not math.isfinite(value):
        return key, value
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in children:
        found = _non_finite(v, f"{key}.{k}" if key else str(k))
        if found:
            return found
    return None


def read_model_config(path: str | Path):
    """The model config of the bundle directory `path` (its config.json: a ModelConfig, or the
    config class of the family it names), or a BundleError."""
    path = Path(path)
    try:
        return model_config_from_json(path / "config.json")
    except ConfigError as e:
        raise BundleError(str(e)) from None


def load_bundle(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                precision: str = "bf16", lora=None, lora_scale=None, lora_mode: str = "merge") -> Bundle:
    """Loads and validates a bundle; returns a `Bundle` with the DiT in eval mode (a
    `TwoExpertDiT` when pipeline.json sets low_noise_boundary). precision "fp8": the block
    linears as FP8Linear (from e4m3-stored weights as they are, or quantised from the stored
    ones), FP8 self-attention (model/precision.py). `lora` (a path or a list; `lora_scale` one
    number or one per file): LoRAs merged into the weights before any FP8 quantisation
    (`lora_mode` "merge"), or kept beside them, switchable (`"unmerged"`; flgengine/lora.py);
    `Bundle.lora` reports what they changed."""
    from .lora import LORA_MODES, LoraReport, lora_list

    if lora_mode not in LORA_MODES:
        raise ValueError(f"lora_mode={lora_mode!r} is not one of {', '.join(LORA_MODES)}")
    loras = lora_list(lora, lora_scale)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
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
    provenance = read_provenance(path)

    report = LoraReport() if loras else None
    if loras and pipeline.low_noise_boundary is not None:
        raise ValueError(f"{path} has two DiTs (high / low noise): LoRAs on two-expert bundles are not supported yet")
    model = _load_dit(path, config, device, dtype, precision, loras, lora_mode, report)
    if pipeline.low_noise_boundary is not None:  # two experts: the low-noise DiT in low_noise/
        low_dir = path / LOW_NOISE_DIR
        for name in ("config.json", "model.safetensors"):
            if not (low_dir / name).is_file():
                raise BundleError(f"{low_dir / name}: missing (pipeline.json sets low_noise_boundary "
                                  f"{pipeline.low_noise_boundary}: a two-expert bundle keeps its low-noise DiT there)")
        low = _load_dit(low_dir, read_model_config(low_dir), device, dtype, precision)
        try:
            model = TwoExpertDiT(model, low, pipeline.low_noise_boundary)
        except ValueError as e:
            raise BundleError(f"{path}: {e}") from None
    return Bundle(path=path, model=model.eval().requires_grad_(False), pipeline=pipeline, provenance=provenance,
                  lora=report)


def _load_dit(path: Path, config, device, dtype, precision: str = "bf16", loras=(), lora_mode: str = "merge",
              report=None):
    """The DiT of `path`/model.safetensors, checked against `config`, cast and moved; `loras`
    [(file, scale)] merged into the weights before FP8 quantisation, or attached."""
    from .lora import attach_lora, lora_deltas, merge_lora_state

    where = f"{path}/model.safetensors"
    state = dequantize_stored(load_safetensors(path / "model.safetensors", where), where)
    # a large model is built on the meta device (no memory, no init) and gets the loaded tensors;
    # a small one (under META_FROM parameters, the stored count) is built on the CPU: the meta
    # device's Python kernels import torch._dynamo, a second of a small model's cold start
    size = sum(v.numel() for v in state.values())
    # a config that implies far more parameters than are stored is built on meta too: the shape
    # check below then refuses it without allocating what it claims
    small = size < META_FROM and config.implied_params() <= 4 * size + 1_000_000
    with contextlib.nullcontext() if small else torch.device("meta"):
        model = build(config)
    fp8_keys = fp8_weight_keys(model)  # the weights e4m3 may hold (the family's blocks say which)
    reason = check_fp8_state(state, where, fp8_keys)
    if reason:
        raise BundleError(reason)
    deltas = []
    if loras:  # read and checked against the model's layers (built on meta) before any weight changes
        with torch.device("meta"):
            probe = build(config)
        deltas = [(lora_deltas(p, probe, report), scale) for p, scale in loras]
    if deltas and lora_mode == "merge":
        state = dequantize_state(state)
        for d, scale in deltas:
            merge_lora_state(state, d, scale)
        deltas = []
    state = quantize_state(state, fp8_keys) if precision == "fp8" else dequantize_state(state)
    if precision == "fp8":
        with contextlib.nullcontext() if small else torch.device("meta"):
            to_fp8(model)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(state, expected, where, "config.json")
    model.load_state_dict(state, assign=True)
    model.cast(dtype if dtype is not None else torch_dtype(config.dtype))
    if device is not None:
        model.to(device)
    for i, (d, scale) in enumerate(deltas):  # lora_mode "unmerged"
        attach_lora(model, d, scale, lora_id=i)
    return model

