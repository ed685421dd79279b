"""The training loop of every stage (`Trainer`), its learning-rate schedule and EMA, and
the FSDP2 / torchrun helpers the stages share. Checkpoints are written by `checkpoint.py`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint


# ---- logging -----------------------------------------------------------------------------------

class MetricsLog:
    """Appends one JSON object per line to `path` (step, wall time, metrics)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()

    def write(self, step: int, **metrics) -> None:
        row = {"step": step, "time": round(time.time() - self.t0, 3), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class NonFiniteLoss(RuntimeError):
    """Loss or gradients became NaN/Inf; the last good checkpoint is kept."""


def non_finite(loss: torch.Tensor, params) -> str | None:
    """What is NaN/Inf in this step ("loss is nan", "non-finite gradients"), or None.
    Looks at this process's shards only; the Trainer agrees on it across processes."""
    if not torch.isfinite(loss.detach()).item():
        return f"loss is {loss.item()}"
    if any(not torch.isfinite(_local(p.grad)).all() for p in params if p.grad is not None):
        return "non-finite gradients"
    return None


# ---- FSDP2: sharded parameters <-> full tensors -------------------------------------------------

def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; other tensors as they are."""
    return t.to_local() if _is_dtensor(t) else t


def _full(obj: Any) -> Any:
    """`obj` (nested dicts/lists) with every DTensor gathered into a full tensor (collective)."""
    if _is_dtensor(obj):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {k: _full(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_full(v) for v in obj)
    return obj


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` distributed as `like` is (a DTensor with its mesh and placements), else `full`."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)


def is_sharded(module: torch.nn.Module) -> bool:
    """True when FSDP2 (`fully_shard`) has sharded `module`'s parameters."""
    return any(_is_dtensor(p) for p in module.parameters())


def fsdp_shard(module: torch.nn.Module) -> torch.nn.Module:
    """Shards `module` in place with FSDP2 across the process group: each of its `blocks`
    one unit (gathered only while it runs; a skipped block is never gathered), the rest
    the root unit. Create optimisers after this. No-op in a single process."""
    if distributed()[1] == 1:
        return module
    from torch.distributed.fsdp import fully_shard

    for part in getattr(module, "experts", lambda: (module,))():  # a TwoExpertDiT's two DiTs, or the module
        for block in getattr(part, "blocks", []):
            fully_shard(block)
    fully_shard(module)
    return module


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state dict with full tensors (a collective call when it is sharded)."""
    return {k: v.detach() for k, v in _full(module.state_dict()).items()}


def load_full_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads full tensors into `module`, sharding them as its parameters are."""
    current = module.state_dict()
    module.load_state_dict({k: _shard_like(v, current[k]) if k in current else v for k, v in state.items()})


def _load_optimizer(opt: torch.optim.Optimizer, state: dict) -> None:
    """Loads a full optimiser state (as `Trainer.save` writes it), sharding each parameter's
    moments like the parameter."""
    params = [p for g in opt.param_groups for p in g["params"]]
    sharded = {}
    for idx, per_param in state["state"].items():
        p = params[int(idx)]
        sharded[idx] = {k: _shard_like(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                        for k, v in per_param.items()}
    opt.load_state_dict({**state, "state": sharded})


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], module: torch.nn.Module, step: int, decay: float, prefix: str = "") -> None:
    """EMA of parameters with warm-up: d = min(decay, (1 + step) / (10 + step)); ema keys are
    `prefix + parameter name`."""
    d = min(decay, (1 + step) / (10 + step))
    for k, p in module.named_parameters():
        ema[prefix + k].mul_(d).add_(p.detach(), alpha=1 - d)


def cosine_lr(step: int, total: int, base: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `floor * base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- the loop ----------------------------------------------------------------------------------

def distributed() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, (0, 1) when not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Joins the process group when launched by torchrun (WORLD_SIZE > 1): NCCL with one GPU
    per process (LOCAL_RANK) where CUDA is available, else gloo. Returns (rank, world size)."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return distributed()


def rank0_decides(value):
    """Rank 0's `value` on every rank (e.g. "is this stage's result already on disk?": a
    rank that looked a moment later could see a file rank 0 is just writing)."""
    rank, world = distributed()
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank0_writes(write) -> None:
    """Runs `write()` (which writes files) on rank 0 only; the others wait until it is done."""
    rank, world = distributed()
    if rank == 0:
        write()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


class Trainer:
    """The training loop of every stage: resumable atomic checkpoints (modules, optimisers,
    EMA, torch RNG, the stage's noise generator, step), a progress bar, a jsonl metrics
    log, NaN/Inf stops that keep the last good checkpoint, a learning-rate schedule and
    data parallelism under torchrun.

        trainer = Trainer(out, {"dit": model}, {"main": opt}, steps=1000, recipe=asdict(cfg))
        for step in trainer:                      # resumes from out/checkpoint.safetensors
            loss = ...(trainer.gen)               # all randomness from trainer.gen
            trainer.update("main", loss)          # zero_grad, backward, finite check, clip, step
            trainer.log(loss=loss.item())
        trainer.close()

    Distributed (torchrun, gloo on CPU / NCCL on GPUs): `trainer.wrap(module)` returns the
    DDP module to run forward through, or the module itself when `fsdp_shard` sharded it
    with FSDP2 (for networks too large for one device; checkpoints still hold full
    tensors). Each rank draws the same global batch randomness from `gen` and takes its
    slice (`trainer.shard(x)`), so the result matches a single process with the same
    global batch. Rank 0 writes checkpoints and logs.
    `recipe` (what the run computes) must match on resume; keys in `runtime` (how it runs:
    threads, device, ...) may change. `added_later` (key -> value): recipe keys a newer version
    added, with the value that computes what older versions did; a checkpoint written before
    a key existed resumes when the key holds that value.
    """

    def __init__(self, out: str | Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                 steps: int, recipe: dict, *, runtime: tuple[str, ...] = (), checkpoint_every: int = 100,
                 ema: dict[str, float] | None = None, schedule=None, seed: int = 0, clip: float = 1.0,
                 desc: str = "train", progress: bool = True, log_every: int = 10, added_later: dict | None = None):
        from tqdm.auto import tqdm

        self.out = Path(out)
        self.rank, self.world = distributed()
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / CHECKPOINT
        self.modules, self.optimizers = modules, optimizers
        self.steps, self.recipe, self.runtime = steps, recipe, runtime
        self.added_later = dict(added_later or {})
        self.checkpoint_every, self.schedule, self.clip, self.log_every = checkpoint_every, schedule, clip, log_every
        self.ema_decay = dict(ema or {})
        self.ema = {f"{m}.{k}": p.detach().clone() for m in self.ema_decay for k, p in modules[m].named_parameters()}
        for opt in optimizers.values():
            for g in opt.param_groups:
                g.setdefault("base_lr", g["lr"])
        self.gen = torch.Generator().manual_seed(seed)
        self.step, self.seconds, self.extra = 0, 0.0, {}
        self._metrics: dict[str, float] = {}
        if self.path.exists():
            self._resume()
        self.log_file = MetricsLog(self.out / "metrics.jsonl") if self.rank == 0 else None
        self.bar = tqdm(total=steps, initial=self.step, desc=desc, unit="step", disable=not progress or self.rank != 0)
        self._t0 = time.time() - self.seconds

    # -- state ------------------------------------------------------------------------------
    def _recipe_of(self, recipe):
        """`recipe` without the runtime keys, and without the `added_later` keys that hold the
        value their absence means, at any depth (stage configs nest them)."""
        if not isinstance(recipe, dict):
            return recipe
        later = self.added_later
        return {k: self._recipe_of(v) for k, v in recipe.items()
                if k not in self.runtime and not (k in later and v == later[k])}

    def _resume(self) -> None:
        state = load_checkpoint(self.path)
        if self._recipe_of(state["config"]) != self._recipe_of(json.loads(json.dumps(self.recipe))):
            raise ValueError(f"{self.path} was written by another recipe; use a new output directory or the same options")
        for name, module in self.modules.items():
            load_full_state_dict(module, state["modules"][name])
        for name, opt in self.optimizers.items():
            _load_optimizer(opt, state["optimizers"][name])
        self.ema = {k: _shard_like(v, self.ema[k]) for k, v in state["ema"].items()}
        torch.set_rng_state(state["rng"])
        self.gen.set_state(state["gen"])
        self.step, self.seconds, self.extra = state["step"], state["seconds"], state["extra"]

    def save(self) -> None:
        """Writes the checkpoint (every process calls it: sharded FSDP2 state is gathered into
        full tensors; rank 0 writes, atomically: a kill leaves the previous one intact)."""
        state = _full({"modules": {n: m.state_dict() for n, m in self.modules.items()},
                       "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()}, "ema": self.ema})
        if self.rank != 0:
            return
        save_checkpoint(self.path, {
            "config": self.recipe, "step": self.step, "seconds": time.time() - self._t0, "extra": self.extra,
            **state, "rng": torch.get_rng_state(), "gen": self.gen.get_state()})

    def ema_state(self, name: str) -> dict[str, torch.Tensor]:
        """EMA weights of module `name`, as a state dict of its parameters."""
        prefix = f"{name}."
        return {k[len(prefix):]: v for k, v in self.ema.items() if k.startswith(prefix)}

    # -- distributed ------------------------------------------------------------------------
    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module to run forward through: itself in one process or when FSDP2 has
        sharded it (`fsdp_shard`, before the optimiser was made), else DDP under torchrun."""
        if self.world == 1 or is_sharded(module):
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, find_unused_parameters=True)

    def shard(self, x):
        """This rank's slice of a global batch (a tensor or list along dim 0)."""
        if self.world == 1:
            return x
        n = len(x)
        if n % self.world:
            raise ValueError(f"global batch {n} is not divisible by the {self.world} processes")
        per = n // self.world
        return x[self.rank * per:(self.rank + 1) * per]

    # -- the loop ---------------------------------------------------------------------------
    def __iter__(self):
        while self.step < self.steps:
            if self.schedule is not None:
                factor = self.schedule(self.step)
                for opt in self.optimizers.values():
                    for g in opt.param_groups:
                        g["lr"] = g["base_lr"] * factor
            self._metrics = {}
            yield self.step
            for name, decay in self.ema_decay.items():
                ema_update({k: v for k, v in self.ema.items() if k.startswith(f"{name}.")},
                           self.modules[name], self.step, decay, prefix=f"{name}.")
            self.step += 1
            self.bar.update(1)
            if self._metrics:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in list(self._metrics.items())[:3]})
            evaluated = any(k.startswith("eval") for k in self._metrics)  # evaluations are always logged
            if self.log_file is not None and (self.step % self.log_every == 0 or self.step == self.steps or evaluated):
                self.log_file.write(self.step, **self._metrics)
            if self.step % self.checkpoint_every == 0 or self.step == self.steps:
                self.save()

    def update(self, name: str, loss: torch.Tensor) -> float:
        """One optimiser step of `name` on `loss`; returns the gradient norm (before clipping)."""
        opt = self.optimizers[name]
        params = [p for g in opt.param_groups for p in g["params"]]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # a parameter this step did not use (a block skipped in Stage II) gets a zero gradient,
        # as DDP all-reduces for it: one process and N processes then update it alike
        for p in params:
            if p.grad is None and p.requires_grad:
                p.grad = torch.zeros_like(p)
        problem = non_finite(loss, params)
        if self.world > 1:  # every process stops together, also when only one saw it
            import torch.distributed as dist

            flag = torch.tensor([0.0 if problem is None else 1.0], device=loss.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0 and problem is None:
                problem = "non-finite loss or gradients in another process"
        if problem is not None:
            raise NonFiniteLoss(f"step {self.step}: {problem}; stopping. The last good checkpoint is {self.path}")
        norm = torch.nn.utils.clip_grad_norm_(params, self.clip if self.clip else float("inf"))
        opt.step()
        return float(_full(norm))

    def log(self, **metrics: float) -> None:
        self._metrics.update({k: float(v) for k, v in metrics.items()})

    def close(self) -> float:
        """Closes the progress bar; returns the run's wall seconds (resumed runs included)."""
        self.bar.close()
        self.seconds = time.time() - self._t0
        return self.seconds
