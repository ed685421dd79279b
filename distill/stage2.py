"""Stage II of FastLightGen: dynamic probabilistic pruning.

One network, initialised from the teacher, runs in two modes on the same (x_t, t, c):
full (every block) and pruned (each candidate block of the plan skipped with probability
`skip_prob`, drawn per block per step; in `all_off_share` of the steps every candidate is
skipped, so the final architecture is trained directly):

    x_t = (1 - t) x0 + t eps,  t = shift(u),  c = uncond with probability cond_dropout
    L = alpha * || f_pruned(x_t) - stopgrad(f_full(x_t)) ||^2 + (1 - alpha) * || f_pruned(x_t) - (eps - x0) ||^2
        + anchor * || f_full(x_t) - stopgrad(f_teacher(x_t)) ||^2          (anchor: ours, default 0)

With `guidance` g > 1 (ours, default off) every sample also runs unconditionally, and the
self-distillation matches both branches and the guided velocity the pruned mode is used with
(Stage III's real score, CFG sampling), f^g = f(uncond) + g (f(c) - f(uncond)):
    self_distill = mean over both branches || f_pruned - f_full ||^2 + || f_pruned^g - f_full^g ||^2 / g^2
(with condition dropout 0.1 alone the unconditional branch sees a tenth of the samples, and
CFG multiplies the branches' disagreement by g).

Every `eval_every` steps the flow loss of both modes (full, all candidates off) on a fixed
held-out batch is logged (`eval_full`, `eval_pruned`): pruned-mode quality should fall
towards full-mode quality while full mode holds.

    python -m distill stage2 --teacher flgengine/assets/shapes-teacher --plan runs/s/plan.json --out runs/s/stage2
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from flgengine.config import ConfigError, JsonConfig
from flgengine.model import DiT
from flgengine.sampling import shift_sigmas

from .data import condition_of, conditioned
from .importance import skip_blocks
from .plan import PruningPlan
from .trainer import Trainer, cosine_lr, fsdp_shard, full_state_dict, is_sharded

DRIFT_WARNING = 1.5  # warn when the full mode's held-out flow loss grows by more than this factor
RUNTIME = ("threads", "checkpoint_every", "eval_every", "device", "fsdp")


@dataclass
class Stage2Config(JsonConfig):
    """Stage II recipe (strict: unknown keys are errors)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-4
    warmup: int = 20
    alpha: float = 1.0
    skip_prob: float = 0.5
    all_off_share: float = 0.25
    anchor: float = 0.0
    t_shift: float = 2.0
    cond_dropout: float = 0.1
    guidance: float = 0.0  # > 1: self-distil the unconditional branch and the guided velocity at this CFG scale too
    seed: int = 0
    checkpoint_every: int = 50
    eval_every: int = 50
    eval_batch: int = 32
    threads: int | None = None
    device: str = "cpu"
    fsdp: bool = False  # under torchrun: shard the network with FSDP2 instead of DDP

    def __post_init__(self) -> None:
        def need(cond: bool, key: str, what: str) -> None:
            if not cond:
                raise ConfigError(f"stage2.{key} must be {what}, got {getattr(self, key)!r}")

        for key in ("steps", "batch_size", "checkpoint_every", "eval_every", "eval_batch"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) >= 1, key, "an integer >= 1")
        need(isinstance(self.warmup, int) and self.warmup >= 0, "warmup", "an integer >= 0")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", "> 0")
        for key in ("alpha", "skip_prob", "all_off_share", "cond_dropout"):
            need(0 <= getattr(self, key) <= 1, key, "in [0, 1]")
        need(math.isfinite(self.anchor) and self.anchor >= 0, "anchor", ">= 0")
        need(math.isfinite(self.guidance) and (self.guidance == 0 or self.guidance > 1), "guidance",
             "0 (off) or a CFG scale > 1")
        need(isinstance(self.fsdp, bool), "fsdp", "true or false")
        need(math.isfinite(self.t_shift) and self.t_shift > 0, "t_shift", "> 0")


def draw_skips(candidates: list[int], cfg: Stage2Config, gen: torch.Generator) -> list[int]:
    """Block positions skipped this step: all candidates in `all_off_share` of the steps,
    otherwise each candidate independently with probability `skip_prob`, redrawn while
    none is skipped (then pruned mode = full mode: the loss is 0 up to rounding, and Adam
    would turn that rounding noise into full-size updates)."""
    if not candidates:
        raise ValueError("Stage II needs at least one candidate block (the plan drops none)")
    if torch.rand((), generator=gen).item() < cfg.all_off_share or cfg.skip_prob >= 1:
        return list(candidates)
    if cfg.skip_prob <= 0:
        raise ValueError("stage2.skip_prob 0 with all_off_share < 1 never skips a block in some steps")
    while True:
        coins = torch.rand(len(candidates), generator=gen).tolist()
        skip = [b for b, c in zip(candidates, coins) if c < cfg.skip_prob]
        if skip:
            return skip


def noisy_batch(x0: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor, gen: torch.Generator,
                t_shift: float, cond_dropout: float):
    """(x_t, t, context with dropout, target v = eps - x0); randomness from `gen` (CPU). (An
    image-to-video model's condition is put in at each call: data.conditioned; dropout drops the
    prompt only.)"""
    B = x0.shape[0]
    drop = torch.rand(B, generator=gen) < cond_dropout
    context = torch.where(drop.view(B, 1, 1).to(context.device), uncond.to(context), context)
    t = shift_sigmas(torch.rand(B, generator=gen), t_shift).to(x0.device)  # (B,)
    eps = torch.randn(x0.shape, generator=gen).to(x0.device)
    tt = t.view(B, 1, 1, 1, 1)
    return (1 - tt) * x0 + tt * eps, t, context, eps - x0


def stage2_loss(model: DiT, teacher: DiT | None, x_t, t, context, target, skip: list[int], cfg: Stage2Config,
                net=None, uncond: torch.Tensor | None = None, cond=None) -> dict:
    """The Stage II objective on one batch; returns the loss and its parts. `net` is the
    module to run forward passes with gradients through (`model` or its DDP wrapper);
    `uncond` (1, L, text_dim) is needed when cfg.guidance > 1; `cond`: an image-to-video
    batch's condition (data.condition_of), put into every call."""
    net = conditioned(model if net is None else net, cond)
    teacher_run, model_run = conditioned(teacher, cond), conditioned(model, cond)
    B, T = x_t.shape[0], 1000 * t
    guided = cfg.guidance > 1
    if guided:  # [cond; uncond] in one batch: (2B, ...)
        if uncond is None:
            raise ValueError("stage2.guidance > 1 needs the unconditional context")
        x_t, T = torch.cat([x_t, x_t]), torch.cat([T, T])
        context = torch.cat([context, uncond.to(context).expand(B, -1, -1)])
    if cfg.anchor > 0:
        v_full = net(x_t, T, context)
        with torch.no_grad():
            v_teacher = teacher_run(x_t, T, context)
        anchor = F.mse_loss(v_full, v_teacher)
        v_full = v_full.detach()
    else:
        with torch.no_grad():
            v_full = model_run(x_t, T, context)
        anchor = torch.zeros(())
    with skip_blocks(model, skip):
        v_pruned = net(x_t, T, context)
    self_distill = F.mse_loss(v_pruned, v_full)
    if guided:
        g = cfg.guidance
        cfg_of = lambda v: v[B:] + g * (v[:B] - v[B:])  # noqa: E731 (v_u + g (v_c - v_u))
        self_distill = self_distill + F.mse_loss(cfg_of(v_pruned), cfg_of(v_full)) / g**2
    flow = F.mse_loss(v_pruned[:B], target)
    loss = cfg.alpha * self_distill + (1 - cfg.alpha) * flow + cfg.anchor * anchor
    return {"loss": loss, "self_distill": self_distill.detach(), "flow_pruned": flow.detach(), "anchor": anchor.detach()}


@torch.no_grad()
def mode_losses(model: DiT, plan: PruningPlan, heldout, uncond: torch.Tensor | None = None) -> dict[str, float]:
    """Flow loss of full mode and of the final architecture (all candidates off) on a fixed batch;
    with `uncond`, also how far the final architecture's conditional and unconditional velocities
    are from the full mode's (mean squared gap; CFG scales their difference)."""
    x_t, t, context, target, cond = heldout
    run = conditioned(model, cond)
    full = run(x_t, 1000 * t, context)
    with skip_blocks(model, plan.drop):
        pruned = run(x_t, 1000 * t, context)
    out = {"eval_full": F.mse_loss(full, target).item(), "eval_pruned": F.mse_loss(pruned, target).item()}
    if uncond is not None:
        unc = uncond.to(context).expand(len(context), -1, -1)
        full_u = run(x_t, 1000 * t, unc)
        with skip_blocks(model, plan.drop):
            pruned_u = run(x_t, 1000 * t, unc)
        out.update(gap_cond=F.mse_loss(pruned, full).item(), gap_uncond=F.mse_loss(pruned_u, full_u).item())
    return out


def train_stage2(teacher: DiT, plan: PruningPlan, data, cfg: Stage2Config, out: str | Path,
                 progress: bool = True) -> tuple[DiT, dict]:
    """Runs (or resumes) Stage II in `out`; returns the Stage II network (full depth, EMA-free:
    the last weights) and a provenance record. `data.batch(step, n)` -> (x0, context)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if plan.num_blocks != len(teacher.blocks):
        raise ValueError(f"the plan is for {plan.num_blocks} blocks, the teacher has {len(teacher.blocks)}")
    frozen = copy.deepcopy(teacher).eval().requires_grad_(False) if cfg.anchor > 0 else None
    model = copy.deepcopy(teacher).to(cfg.device).train().requires_grad_(True)
    if cfg.fsdp:
        fsdp_shard(model)  # before the optimiser: it must hold the sharded parameters
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    trainer = Trainer(out, {"dit": model}, {"main": opt}, cfg.steps, {"stage2": cfg.to_dict(), "plan": plan.to_dict()},
                      runtime=RUNTIME, checkpoint_every=cfg.checkpoint_every,
                      schedule=lambda s: cosine_lr(s, cfg.steps, 1.0, cfg.warmup), seed=cfg.seed,
                      desc="stage2", progress=progress)
    if trainer.world > 1 and cfg.anchor > 0:
        raise ValueError("stage2.anchor > 0 runs two forward passes with gradients per step, which DDP does not "
                         "support: use anchor 0 under torchrun")
    net = trainer.wrap(model)
    uncond = data.uncond.to(cfg.device)
    # the held-out batch: data far past any training step, its own noise
    held_out = 10**9
    hx0, hctx = data.batch(held_out, cfg.eval_batch)
    heldout = (*noisy_batch(hx0.to(cfg.device), hctx.to(cfg.device), uncond, torch.Generator().manual_seed(cfg.seed + 1),
                            cfg.t_shift, 0.0), condition_of(data, hx0.to(cfg.device), held_out))
    if trainer.step == 0:
        trainer.extra["start"] = mode_losses(model, plan, heldout, uncond)
    for step in trainer:
        x0, context = data.batch(step, cfg.batch_size)
        # every rank draws the global batch's randomness, then keeps its slice (= one process)
        x0 = x0.to(cfg.device)
        x_t, t, context, target = (trainer.shard(z) for z in noisy_batch(
            x0, context.to(cfg.device), uncond, trainer.gen, cfg.t_shift, cfg.cond_dropout))
        cond = condition_of(data, x0, step)
        cond = None if cond is None else cond.map(trainer.shard)
        skip = draw_skips(plan.drop, cfg, trainer.gen)
        parts = stage2_loss(model, frozen, x_t, t, context, target, skip, cfg, net=net, uncond=uncond, cond=cond)
        trainer.log(grad_norm=trainer.update("main", parts["loss"]), **{k: v.item() for k, v in parts.items()},
                    skipped=len(skip))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            trainer.log(**mode_losses(model, plan, heldout, uncond))
            model.train()
    seconds = trainer.close()
    end = mode_losses(model.eval(), plan, heldout, uncond)
    if is_sharded(model):  # hand back an ordinary network with the full weights, on every rank
        weights, model = full_state_dict(model), copy.deepcopy(teacher).to(cfg.device)
        model.load_state_dict(weights)
    start = trainer.extra.get("start")
    drift = end["eval_full"] / start["eval_full"] if start else None
    if drift is not None and drift > DRIFT_WARNING and trainer.rank == 0:
        warnings.warn(f"Stage II: the full mode's held-out flow loss rose {drift:.2f}x ({start['eval_full']:.4g} -> "
                      f"{end['eval_full']:.4g}): the shared weights drifted from the teacher; raise stage2.anchor or "
                      "lower stage2.lr", stacklevel=2)
    record = {"stage": "stage2", "recipe": cfg.to_dict(), "plan": {"drop": plan.drop, "keep": plan.keep},
              "train_seconds": round(seconds, 1), "steps": trainer.step, "samples": trainer.step * cfg.batch_size,
              "heldout_flow_loss": {"start": start, "end": end, "full_mode_drift": drift}}
    return model.requires_grad_(False), record


def config_from_dict(data: dict, source: str = "stage2") -> Stage2Config:
    return Stage2Config.from_dict({**dataclasses.asdict(Stage2Config()), **data}, source)
