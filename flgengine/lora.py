"""LoRA on DiTs: the common Wan LoRA files read, a teacher's LoRA mapped onto a pruned student,
merged into the weights (default) or kept beside them and switchable.

    pipe = flgengine.load("student", lora="style.safetensors", lora_scale=0.8)   # merged
    pipe = flgengine.load("student", lora=["a.safetensors", "b.safetensors"], lora_mode="unmerged")
    pipe.dit.set_lora_scale(0.0)   # unmerged: off (bit-identical to no LoRA), then back on

A LoRA adds `scale * (alpha / rank) * up @ down` to a Linear's weight (`up` (out, rank),
`down` (rank, in); no alpha: 1), and `scale * diff_b` to its bias where the file has one.
Key formats read (safetensors only):

    diffusers / PEFT   [transformer.|base_model.model.]blocks.0.attn1.to_q.lora_A.weight, .lora_B.weight
    original Wan       [diffusion_model.]blocks.0.self_attn.q.lora_down.weight, .lora_up.weight, .alpha, .diff_b
    kohya / ComfyUI    lora_unet_blocks_0_self_attn_q.lora_down.weight, ...

Module names are the model family's diffusers names (Wan, HunyuanVideo) or Wan's original ones.
A LoRA names the teacher's blocks; on a pruned student (`config.block_ids`) the deltas of the
removed blocks are dropped, with a warning saying how much of the LoRA's weight norm went with
them. Keys that match no layer of the model are reported (a warning, and `LoraReport.unmatched`),
never silently ignored; a LoRA whose layers have other shapes, or that matches nothing, is an
error before anything is changed.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .files import PICKLE_SUFFIXES, BundleError, load_safetensors

__all__ = ["LoraDelta", "LoraReport", "LORA_MODES", "read_lora", "lora_deltas", "lora_list", "merge_lora_state",
           "attach_lora", "LoraLinear"]

PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_")
PARTS = {".lora_A.weight": "down", ".lora_down.weight": "down", ".lora_B.weight": "up", ".lora_up.weight": "up",
         ".alpha": "alpha", ".lora_B.bias": "bias", ".diff_b": "bias"}
@dataclass
class LoraDelta:
    """One layer's low-rank update: `up` (out, r) @ `down` (r, in) * alpha / r, + `bias` (out,)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    bias: torch.Tensor | None = None

    @property
    def factor(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]

    def weight(self) -> torch.Tensor:
        """The full (out, in) update in fp32."""
        return (self.up.float() @ self.down.float()) * self.factor


@dataclass
class LoraReport:
    """What loading LoRAs did: the layers changed, the keys that matched nothing, the share of
    each LoRA's weight norm that went with a pruned student's removed blocks."""

    layers: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    dropped_norm: dict[str, float] = field(default_factory=dict)


def _our_name(module: str, config) -> str | None:
    """Our module name (teacher block indices) of a LoRA's module name, as the model family's
    converter reads it (`convert.<family>.module_name`); None if none fits."""
    from .convert import BY_FAMILY

    return BY_FAMILY[config.family].module_name(module, config)


def read_lora(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, list[str]], list[str]]:
    """A LoRA file's tensors grouped by module: ({module name as in the file, prefix stripped:
    {"down", "up", "alpha", "bias"}}, {module name: its keys in the file}, keys of no LoRA form).
    Pickle files are refused."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise BundleError(f"{path}: a pickle file; flgengine reads LoRAs from safetensors only")
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    sd = load_safetensors(path, str(path))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    sources: dict[str, list[str]] = {}
    other = []
    for key, value in sd.items():
        name = key
        for p in PREFIXES:
            if name.startswith(p):
                name = name[len(p):]
                break
        part = next((s for s in PARTS if name.endswith(s)), None)
        if part is None:
            other.append(key)
            continue
        modules.setdefault(name[: -len(part)], {})[PARTS[part]] = value
        sources.setdefault(name[: -len(part)], []).append(key)
    return modules, sources, other


def lora_deltas(path: str | Path, model: nn.Module, report: LoraReport | None = None) -> dict[str, LoraDelta]:
    """{our module name in `model` (a pruned student's block positions): LoraDelta} of the LoRA
    file `path`, every delta's shape checked against the model's Linear. Keys that match no layer
    go to `report.unmatched` (and a warning); removed blocks' deltas are dropped (a warning with
    the share of the LoRA's weight norm they held)."""
    report = report if report is not None else LoraReport()
    config = model.config
    kept = config.kept_blocks
    position = {b: i for i, b in enumerate(kept)}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    modules, sources, other = read_lora(path)
    unmatched = list(other)
    deltas: dict[str, LoraDelta] = {}
    norms = {"kept": 0.0, "dropped": 0.0}
    for module, parts in modules.items():
        name = _our_name(module, config)
        if name is None or "down" not in parts or "up" not in parts:
            unmatched += sources[module]
            continue
        alpha = parts.get("alpha")
        delta = LoraDelta(parts["down"], parts["up"], None if alpha is None else float(alpha.float().reshape(-1)[0]),
                          parts.get("bias"))
        size = delta.weight().norm().item() ** 2
        block = re.match(r"blocks\.(\d+)\.(.+)$", name)
        if block:
            b = int(block.group(1))
            if b >= config.num_blocks:
                unmatched += sources[module]
                continue
            if b not in position:  # a block the student does not have
                norms["dropped"] += size
                continue
            name = f"blocks.{position[b]}.{block.group(2)}"
        layer = linears.get(name)
        if layer is None:
            unmatched += sources[module]
            continue
        want = tuple(layer.weight.shape)
        got = (delta.up.shape[0], delta.down.shape[1])
        if delta.down.dim() != 2 or delta.up.dim() != 2 or delta.up.shape[1] != delta.down.shape[0] or got != want:
            raise ValueError(f"{path}: LoRA for {module} is {tuple(delta.up.shape)} @ {tuple(delta.down.shape)}, the "
                             f"model's {name} is {want} (out, in): a LoRA for another architecture or size?")
        if delta.bias is not None and tuple(delta.bias.shape) != (want[0],):
            raise ValueError(f"{path}: LoRA bias for {module} is {tuple(delta.bias.shape)}, the model's is ({want[0]},)")
        deltas[name] = delta
        norms["kept"] += size
    if not deltas and not norms["dropped"]:
        raise ValueError(f"{path}: no key matches a layer of this {config.family} model (a LoRA for another "
                         f"architecture?); keys like {sorted(unmatched)[:3]}")
    if unmatched:
        report.unmatched += [f"{Path(path).name}: {k}" for k in sorted(unmatched)]
        warnings.warn(f"{path}: {len(unmatched)} LoRA keys match no layer of the model and are not applied, e.g. "
                      f"{', '.join(sorted(unmatched)[:3])}", stacklevel=2)
    if norms["dropped"]:
        share = norms["dropped"] ** 0.5 / (norms["dropped"] + norms["kept"]) ** 0.5
        report.dropped_norm[str(path)] = share
        warnings.warn(f"{path}: the student removed blocks this LoRA changes; their deltas are dropped "
                      f"({share:.1%} of the LoRA's weight norm)", stacklevel=2)
    report.layers += sorted(deltas)
    return deltas


@torch.no_grad()
def merge_lora_state(state: dict[str, torch.Tensor], deltas: dict[str, LoraDelta], scale: float = 1.0) -> None:
    """Adds `scale` times each delta to its layer's weight (and bias) in a state dict, in fp32:
    the changed tensors become fp32 (the model's `cast` takes them to its dtype)."""
    for name, delta in deltas.items():
        state[f"{name}.weight"] = state[f"{name}.weight"].float() + scale * delta.weight()
        if delta.bias is not None and f"{name}.bias" in state:
            state[f"{name}.bias"] = state[f"{name}.bias"].float() + scale * delta.bias.float()


class LoraLinear(nn.Module):
    """A Linear with LoRAs beside it (unmerged): base(x) + sum_k scale_k * (x @ down_k^T @ up_k^T
    * alpha_k / r_k + bias_k). `scales` can change between calls; all zero = the base exactly."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.downs, self.ups = nn.ParameterList(), nn.ParameterList()
        self.factors: list[float] = []
        self.biases: list[torch.Tensor | None] = []
        self.scales: list[float] = []
        self.ids: list[int] = []  # which loaded LoRA each entry is (set_lora_scale's order)

    @property
    def weight(self) -> torch.Tensor:  # the base layer's, for code that reads a Linear's weight
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def add(self, delta: LoraDelta, scale: float, lora_id: int = 0) -> None:
        w = self.base.weight
        dtype = w.dtype if w.is_floating_point() and w.element_size() >= 2 else torch.bfloat16
        self.downs.append(nn.Parameter(delta.down.to(w.device, dtype), requires_grad=False))
        self.ups.append(nn.Parameter(delta.up.to(w.device, dtype), requires_grad=False))
        self.factors.append(delta.factor)
        self.biases.append(None if delta.bias is None else delta.bias.to(w.device, dtype))
        self.scales.append(float(scale))
        self.ids.append(lora_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for down, up, f, b, s in zip(self.downs, self.ups, self.factors, self.biases, self.scales):
            if s == 0:
                continue
            y = (x.to(down.dtype) @ down.t()) @ up.t() * (s * f)
            if b is not None:
                y = y + s * b
            out = out + y.to(out.dtype)
        return out


def attach_lora(model: nn.Module, deltas: dict[str, LoraDelta], scale: float = 1.0, lora_id: int = 0) -> None:
    """Puts each delta beside its Linear (LoraLinear, unmerged), as LoRA number `lora_id`;
    `model.set_lora_scale` then changes the attached LoRAs' scales."""
    for name, delta in deltas.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, attr)
        if not isinstance(layer, LoraLinear):
            layer = LoraLinear(layer)
            setattr(parent, attr, layer)
        layer.add(delta, scale, lora_id)

    def set_lora_scale(scale: float | list[float]) -> None:
        """One scale for every attached LoRA, or one per LoRA in the order they were loaded."""
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.scales = [float(scale[i]) if isinstance(scale, (list, tuple)) else float(scale) for i in m.ids]

    model.set_lora_scale = set_lora_scale


LORA_MODES = ("merge", "unmerged")


def lora_list(lora, lora_scale) -> list[tuple[Path, float]]:
    """[(path, scale)] of load()'s `lora` (a path or a list) and `lora_scale` (one number, or one
    per LoRA), checked before anything loads."""
    if lora is None:
        if lora_scale not in (None, 1.0):
            raise ValueError(f"lora_scale={lora_scale!r} without a lora")
        return []
    paths = [Path(p) for p in (lora if isinstance(lora, (list, tuple)) else [lora])]
    if not paths:
        raise ValueError("lora is an empty list")
    scales = lora_scale if isinstance(lora_scale, (list, tuple)) else [1.0 if lora_scale is None else lora_scale] * len(paths)
    if len(scales) != len(paths):
        raise ValueError(f"lora_scale lists {len(scales)} scales for {len(paths)} LoRAs")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or s != s or abs(s) == float("inf"):
            raise ValueError(f"lora_scale must be finite numbers, got {s!r}")
    for p in paths:
        if p.suffix in PICKLE_SUFFIXES:
            raise BundleError(f"{p}: a pickle file; flgengine reads LoRAs from safetensors only")
        if not p.is_file():
            raise FileNotFoundError(f"LoRA file not found: {p}")
    return list(zip(paths, (float(s) for s in scales)))
