"""Adaptation: how a sparse-aware or FP8-aware Stage III starts.

A student trained dense and in full precision, then run another way, drifts from what it was
trained to compute. With a block-sparse self-attention pattern it breaks: the keys it no longer
sees carried softmax mass (on the shapes world, adherence 0.93 falls to 0.2-0.5 at density <= 0.4
without training, and DMD steps from there do not recover it). In FP8 (e4m3 weights and
activations, 3 mantissa bits) it loses a few videos. So before any DMD steps the student, run the
new way (its pattern on, FP8's numerics in its forward), first learns what its dense fp32 self
computes, at its own sampling steps, along its own dense trajectories:

    z ~ N(0, I),  k ~ U{0, ..., K-1}
    x = the dense student's state at its step k from z        (steps 0..k-1 without gradients:
                                                                x0 = x - s_i v(x), x = (1 - s_{i+1}) x0 + s_{i+1} eps)
    L = || v_new(x, s_k) - v_dense(x, s_k) ||^2

Self-distillation: no teacher and no clips, only prompts (and the first frames of an
image-to-video student). `stage3.adapt_steps` steps of `stage3.batch_size` at `stage3.adapt_lr`
(constant, or decayed to a tenth along a cosine with `adapt_schedule: cosine`), in OUT/adapt
(resumable like every stage); then the DMD steps (if any) continue from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flgengine.model import DiT

from .data import condition_of, conditioned
from .stage3 import RUNTIME, _draw_global, latent_shape, student_state
from .trainer import Trainer, cosine_lr


def adapt_student(student: DiT, dense: DiT, data, cfg, out, progress: bool = True) -> tuple[DiT, dict]:
    """Trains `student` (its pattern set and / or FP8's numerics on) to give `dense`'s velocity (the
    same network as it was, frozen) at the sampler's steps `cfg.sigmas()`; returns it and a
    provenance record."""
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.adapt_lr, betas=(0.9, 0.99), weight_decay=0.0)
    recipe = {"adapt": {"steps": cfg.adapt_steps, "lr": cfg.adapt_lr, "batch_size": cfg.batch_size,
                        "attention": cfg.attention,
                        **({"precision": cfg.precision} if cfg.precision != "bf16" else {}),
                        **({"schedule": cfg.adapt_schedule, "schedule_steps": cfg.adapt_steps}
                           if cfg.adapt_schedule != "constant" else {}), "sigmas": cfg.sigmas(), "seed": cfg.seed}}
    schedule = (lambda s: cosine_lr(s, cfg.adapt_steps, 1.0, 0)) if cfg.adapt_schedule == "cosine" else None
    trainer = Trainer(out, {"student": student}, {"student": opt}, cfg.adapt_steps, recipe, runtime=RUNTIME,
                      schedule=schedule, checkpoint_every=cfg.checkpoint_every, seed=cfg.seed, desc="adapt", progress=progress)
    net, sigmas = trainer.wrap(student), cfg.sigmas()
    draw = lambda shape: _draw_global(shape, trainer.gen, trainer).to(cfg.device)  # noqa: E731
    first = last = None
    for step in trainer:
        x0_data, context = data.batch(step, cfg.batch_size)
        context = trainer.shard(context.to(cfg.device))
        cond = condition_of(data, x0_data.to(cfg.device), step)
        cond = None if cond is None else cond.map(trainer.shard)
        k = int(torch.randint(len(sigmas), (), generator=trainer.gen))
        noise = draw((context.shape[0], *latent_shape(data)))
        x = student_state(conditioned(dense, cond), noise, context, sigmas, k, trainer.gen, draw)  # (B, C, F, H, W)
        T = torch.full((x.shape[0],), 1000 * sigmas[k], device=x.device)
        with torch.no_grad():
            target = conditioned(dense, cond)(x, T, context)
        loss = F.mse_loss(conditioned(net, cond)(x, T, context), target)
        grad_norm = trainer.update("student", loss)
        trainer.log(loss=loss.item(), grad_norm=grad_norm, k=k, lr=opt.param_groups[0]["lr"])
        first = loss.item() if first is None else first
        last = loss.item()
    seconds = trainer.close()
    record = {"stage": "adapt", "recipe": recipe["adapt"], "steps": trainer.step, "train_seconds": round(seconds, 1),
              **({"loss_first": round(first, 6), "loss_last": round(last, 6)} if first is not None else {})}
    return student, record
