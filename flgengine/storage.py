"""How a bundle's weights are stored on disk.

A bundle's model.safetensors holds the DiT's state dict in one of these forms
(provenance.json's "storage_dtype" names it; loading always gives float32 first and then
casts to the compute dtype):

    as trained       float32 (no storage_dtype)
    float16 / bf16   every floating tensor rounded                     1/2 of fp32
    int8             tensors of >= 2 dims: int8 rows, one fp32 scale   ~1/4
                     per row under `name + INT8_SCALE`; others fp16
    int4             the blocks' linear weights (`blocks.*.weight`,     ~1/7
                     2-D, input dim a multiple of INT4_GROUP): 4-bit
                     values, two per byte, one fp16 scale per group of
                     INT4_GROUP under `name + INT4_SCALE`; the rest
                     (embeddings, timestep MLP, head) as int8 stores it
    fp8              the block linears e4m3 with per-output-channel scales (model/precision.py)

int8 and int4 are round-to-nearest with symmetric scales (no calibration data):

    int8:  scale_r = max_j |w_rj| / 127          q_rj = round(w_rj / scale_r)       in [-127, 127]
    int4:  scale_rg = fp16(c_rg * max_{j in g} |w_rj| / 7)   q_rj = clamp(round(w_rj / scale_rg), -7, 7)
           c_rg in INT4_CLIPS (1, 0.98, ..., 0.5): per group the one whose sum_j (w_rj - q_rj scale_rg)^2
           is smallest (c = 1, the group's max on the grid, is a candidate, so never worse than it)
           byte = (q_r,2k + 8) | (q_r,2k+1 + 8) << 4          (out, in) -> uint8 (out, in / 2)

int8 keeps |w - q * scale| <= scale / 2 element by element; int4 does for every weight inside
its group's clip (|w| <= 7 scale) and clips the few outside it: 15 levels are too few to spend
on one outlier (on the shapes students' block linears the relative error falls from 10.2% to
9.4%, and the Fréchet distance of their videos back to that of fp16; bench/RESULTS.md,
2026-12-05). What a storage costs is measured per model before it is used.
The layers outside the blocks stay int8 (the set FP8 keeps in higher precision too): on the
shapes image-to-video teacher, int4 there doubled the Fréchet distance of its videos.
"""

from __future__ import annotations

import torch

from .config import TORCH_DTYPES, torch_dtype
from .files import BundleError

__all__ = ["STORAGE_DTYPES", "INT8_SCALE", "INT4_SCALE", "INT4_GROUP", "check_int4_group", "storage_dtype_of", "storage_name",
           "INT4_CLIPS", "store_state", "quantize_int8", "quantize_int4", "dequantize_stored"]

STORAGE_DTYPES = (*TORCH_DTYPES, "int8", "int4", "fp8")  # names a bundle's weights can be stored in
INT4_CLIPS = tuple(1.0 - 0.02 * i for i in range(26))  # int4: the clips c tried per group (of its max |w|)
INT8_SCALE = ".int8_scale"  # int8 storage: the key suffix of a tensor's per-row scales
INT4_SCALE = ".int4_scale"  # int4 storage: the key suffix of a matrix's per-group scales
INT4_GROUP = 64  # int4 storage: weights per scale, along the input dim


def storage_dtype_of(name: str | None) -> torch.dtype | None:
    """A bundle's storage dtype by name: one of TORCH_DTYPES' names, "int8", "int4" or "fp8"."""
    if name is None:
        return None
    special = {"int8": torch.int8, "int4": torch.int4, "fp8": torch.float8_e4m3fn}
    return special[name] if name in special else torch_dtype(name)


def storage_name(dtype: torch.dtype) -> str:
    """The name provenance.json records for a storage dtype (storage_dtype_of's inverse)."""
    return "fp8" if dtype == torch.float8_e4m3fn else str(dtype).replace("torch.", "")


def store_state(state: dict[str, torch.Tensor], dtype: torch.dtype | None,
                int4_group: int = INT4_GROUP, fp8_keys: frozenset[str] | None = None) -> dict[str, torch.Tensor]:
    """The state dict as model.safetensors stores it in `dtype` (None: as it is); int4 in groups of
    `int4_group` weights per scale; fp8 the weights `fp8_keys` (model.precision.fp8_weight_keys)."""
    from .model.precision import quantize_state

    if dtype is None:
        return state
    if dtype == torch.int8:
        return quantize_int8(state)
    if dtype == torch.int4:
        return quantize_int4(state, int4_group)
    if dtype == torch.float8_e4m3fn:
        if fp8_keys is None:  # which weights are the block linears only the model knows
            raise ValueError("fp8 storage needs the model's FP8 weight keys (model.precision.fp8_weight_keys)")
        return quantize_state(state, fp8_keys)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.detach().float()
    scale = w.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0  # (..., 1)
    return torch.round(w / scale).clamp_(-127, 127).to(torch.int8), scale


def quantize_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int8 storage: each floating tensor of >= 2 dims becomes int8 rows with one fp32 scale
    per row (under `key + INT8_SCALE`); other floating tensors are stored in float16."""
    out = {}
    for k, v in state.items():
        if v.is_floating_point() and v.dim() >= 2:
            out[k], out[k + INT8_SCALE] = _int8_rows(v)
        else:
            out[k] = v.half() if v.is_floating_point() else v
    return out


def _int4_eligible(key: str, v: torch.Tensor, group: int) -> bool:
    """A block's linear weight (`blocks.N.<...>.weight`, 2-D) whose input dim splits into groups."""
    return (key.startswith("blocks.") and key.endswith(".weight") and v.is_floating_point() and v.dim() == 2
            and v.shape[1] % group == 0)


def check_int4_group(group: int) -> int:
    """`group` if it is a valid int4 group size (an even number >= 2), else ValueError."""
    if isinstance(group, bool) or not isinstance(group, int) or group < 2 or group % 2:
        raise ValueError(f"int4 group must be an even number >= 2, got {group!r}")
    return group


def quantize_int4(state: dict[str, torch.Tensor], group: int = INT4_GROUP) -> dict[str, torch.Tensor]:
    """int4 storage: each block linear's weight (out, in) (`blocks.*.weight`, 2-D, `in` a
    multiple of `group`) becomes uint8 (out, in / 2), two 4-bit values a byte, with fp16 scales
    (out, in / group) under `key + INT4_SCALE`, each the clip of its group's max |w| that rounds
    the group with the least squared error; every other tensor as quantize_int8 stores it."""
    check_int4_group(group)
    out = {}
    for k, v in state.items():
        if not _int4_eligible(k, v, group):
            out.update(quantize_int8({k: v}))
            continue
        rows, cols = v.shape
        w = v.detach().float().reshape(rows, cols // group, group)  # (out, groups, group)
        scale = _int4_scales(w)  # (out, groups, 1) fp16, the stored scale
        q = (_int4_round(w, scale.float()) + 8).to(torch.uint8).reshape(rows, cols // 2, 2)  # (out, in / 2, 2) in [1, 15]
        out[k] = q[..., 0] | (q[..., 1] << 4)
        out[k + INT4_SCALE] = scale.squeeze(-1)
    return out


def _int4_round(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """q = clamp(round(w / s), -7, 7), 0 where s = 0 (an all-zero group)."""
    return torch.where(s > 0, torch.round(w / s.clamp_min(torch.finfo(torch.float32).tiny)), 0.0).clamp_(-7, 7)


def _int4_scales(w: torch.Tensor) -> torch.Tensor:
    """Per group of w (out, groups, group) the fp16 scale c * max|w| / 7, c in INT4_CLIPS, with
    the smallest squared rounding error over the group: (out, groups, 1) float16."""
    amax = w.abs().amax(-1, keepdim=True)  # (out, groups, 1)
    best, best_err = amax.half(), torch.full_like(amax, float("inf"))
    for c in INT4_CLIPS:  # from c = 1 down: ties keep the larger clip
        s = (amax * c / 7.0).half()
        err = ((_int4_round(w, s.float()) * s.float() - w) ** 2).sum(-1, keepdim=True)  # (out, groups, 1)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def _unpack_int4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uint8 (out, in / 2) and scales (out, groups) -> float32 (out, in)."""
    rows, half = packed.shape
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(rows, 2 * half).float() - 8.0  # (out, in)
    groups = scale.shape[1]
    return (q.reshape(rows, groups, -1) * scale.float()[..., None]).reshape(rows, 2 * half)


def dequantize_stored(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The float32 tensors of an int8- or int4-stored state dict (quantize_int8 /
    quantize_int4; an int4 matrix's group size is its input dim over its scales' columns);
    others unchanged. Scales that do not match their tensor are a BundleError naming both keys."""
    for key in [k for k in state if k.endswith(INT8_SCALE)]:
        name, scale = key[:-len(INT8_SCALE)], state.pop(key)
        q = state.get(name)
        if q is None or q.dtype != torch.int8 or scale.shape != (*q.shape[:-1], 1):
            raise BundleError(f"{where}: int8 scales {key!r} do not match an int8 tensor {name!r} of rows "
                              f"{tuple(scale.shape[:-1])}")
        state[name] = q.float() * scale.float()
    for key in [k for k in state if k.endswith(INT4_SCALE)]:
        name, scale = key[:-len(INT4_SCALE)], state.pop(key)
        q = state.get(name)
        ok = (q is not None and q.dtype == torch.uint8 and q.dim() == 2 and scale.dim() == 2
              and scale.shape[0] == q.shape[0] and scale.shape[1] > 0 and q.shape[1] % scale.shape[1] == 0)
        if not ok:
            raise BundleError(f"{where}: int4 scales {key!r} {tuple(scale.shape)} do not match a packed uint8 "
                              f"matrix {name!r} {None if q is None else tuple(q.shape)}")
        state[name] = _unpack_int4(q, scale)
    return state
