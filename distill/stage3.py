"""Stage III of FastLightGen: distribution matching (DMD) with a well-guided teacher.

Three networks:
- the student G: the plan's blocks removed for good (`apply_plan`), 4-step sampler over
  shifted sigmas (shift 5: about {1.0, 0.94, 0.83, 0.63}); each step predicts x0 and
  re-noises it to the next sigma;
- the real score: the Stage II network, mixing its pruned (p) and full (u) modes
      v_real = v_p(uncond) + b1 (v_p(c) - v_p(uncond)) + b2 (v_u(c) - v_p(c)),
  b1 ~ U(b1_range), b2 ~ U(b2_range) per step ("well-guided"); or, for the baselines,
  plain CFG of a teacher: v(uncond) + b1 (v(c) - v(uncond)) ("cfg");
- the fake score: a copy of the real-score network trained with the flow loss on the
  student's samples, `fake_updates` updates per generator update.

Generator update (backward simulation: run the current student without gradients to a
random one of its steps, then that step with gradients, giving x = G(z)):

    x_t = (1 - t) x + t eps,   x0_s(x_t) = x_t - t v_s(x_t)            (t = shift(u), u ~ U(t_min, t_max))
    g = (x0_fake(x_t) - x0_real(x_t)) / mean|x - x0_real(x_t)|        (per sample)
    L_G = dmd * 0.5 || x - stopgrad(x - g) ||^2                       (dmd 1 by default; 0: no DMD term)
    (+ data_denoise * || x0_student((1 - s_k) x0_data + s_k eps) - x0_data ||^2, optional)
    (+ gan * softplus(-realism(x noised)), optional: DMD2's adversarial term, distill/gan.py)

Every `eval_every` steps `evaluate(student)` (the shapes world's evaluator metrics) scores
the student and its weights are kept (OUT/evals/); at the end `select` picks the result, not
the last step (a long Stage III over-saturates colour and exaggerates motion): among the
evaluations with motion within 15% of the true speed, those whose adherence is within one
standard error of the best (for an image-to-video student then likewise appearance kept), and
of those the lowest Frechet distance. (Adherence alone would trade a 2-video edge on 180 videos
for twice the Frechet distance.)
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from flgengine.bundle import atomic_save_safetensors, load_safetensors
from flgengine.config import AttentionConfig, ConfigError, JsonConfig, dataclass_from_dict
from flgengine.model import DiT, TwoExpertDiT
from flgengine.model.precision import PRECISIONS, fake_fp8
from flgengine.sampling import euler_sigmas, shift_sigmas

from .data import condition_of, conditioned
from .gan import RealismHead, discriminator_loss, frozen, generator_loss, head_layer, realism_logits
from .importance import skip_blocks
from .plan import PruningPlan, apply_plan
from .trainer import Trainer, distributed, fsdp_shard, full_state_dict, is_sharded, rank0_decides

# how a run runs, not what it computes: `steps` too, since Stage III's learning rates are
# constant (no schedule over the run), so a run resumed with more steps trains on exactly as an
# uninterrupted longer run would ("train longer": the same out, a larger steps); a cosine
# adaptation, whose rate depends on its length, records that length as its `schedule_steps`
RUNTIME = ("threads", "checkpoint_every", "eval_every", "device", "fsdp", "steps")
REAL_SCORES = ("well-guided", "cfg")
ADAPT_SCHEDULES = ("constant", "cosine")
DENOISE_NORMS = ("mse", "l1")


@dataclass
class Stage3Config(JsonConfig):
    """Stage III recipe (strict: unknown keys are errors). The baselines are switches:
    DMD2 at full size = prune false + real_score "cfg"; prune-then-DMD2 = prune true +
    real_score "cfg" on the teacher; FastLightGen = prune true + "well-guided" on Stage II."""

    steps: int = 200
    batch_size: int = 8
    lr_student: float = 2e-5
    lr_fake: float = 1e-4
    fake_updates: int = 5
    num_steps: int = 4
    shift: float = 5.0
    real_score: str = "well-guided"
    prune: bool = True
    b1_range: list[float] = field(default_factory=lambda: [3.0, 4.0])
    b2_range: list[float] = field(default_factory=lambda: [0.1, 0.4])
    # a two-expert real score: b1 for samples at t <= its boundary (the low-noise expert, which the
    # teacher samples with low_noise_guidance, usually 1 = no CFG); None: b1 from b1_range everywhere
    low_noise_b1: float | None = None
    # the DMD term's weight in the student's loss (1: FastLightGen's Stage III). 0 turns distribution
    # matching off, and with it the fake score's updates (unless `gan` trains its head): what is left is
    # the other terms alone, e.g. `data_denoise` as plain supervised training on the data, an ablation
    # that shows what the student's architecture can learn from the data without its teacher
    dmd: float = 1.0
    # EMA of the student's weights (Trainer's warm-up rule); evaluation, selection and the
    # result use the EMA weights. None: the raw weights
    ema_decay: float | None = None
    # paired regression (DMD's regression loss): weight * mse(the student's first-step x0 from
    # noise z, the teacher's own few-step sample from the same z), added to the DMD loss; 0: off
    regression: float = 0.0
    # a denoising loss on the data at the student's own sigmas: weight * mse(the student's x0 from
    # the batch's clean clips noised to sigma_k, those clips), k drawn from `data_denoise_steps`
    # (0-based student steps; null: every step but the first, whose input keeps nothing of the
    # clip). The DMD gradient says where the student's samples should move as a whole; this says
    # what a step from sigma_k should give back of a real clip (its edges); 0: off
    data_denoise: float = 0.0
    data_denoise_steps: list[int] | None = None
    # its distance: "mse" (the student's x0 learns the posterior mean: an edge pixel that is shape or
    # background becomes their blend) or "l1" (the per-pixel posterior median: one or the other)
    data_denoise_norm: str = "mse"
    # DMD2's adversarial term (distill/gan.py): a realism head on the fake score's tokens after block
    # `gan_layer` (null: the middle block) tells real clips from student samples, both noised to
    # t ~ U(0, gan_t_max); the student gets `gan` x the non-saturating generator loss, the fake
    # score's first update of each step `gan_fake` x the head's logistic loss; the head learns at
    # `gan_lr` (null: lr_fake; it starts undecided, logit 0, and has one update a step); gan 0: off
    gan: float = 0.0
    gan_fake: float = 1e-2
    gan_lr: float | None = None
    gan_t_max: float = 0.5
    gan_layer: int | None = None
    t_min: float = 0.02
    t_max: float = 0.98
    t_shift: float = 2.0
    seed: int = 0
    checkpoint_every: int = 20
    eval_every: int = 25
    threads: int | None = None
    device: str = "cpu"
    fsdp: bool = False  # under torchrun: shard the real score, student and fake score with FSDP2
    # the student's self-attention pattern while it trains (sparse-aware distillation), as in
    # config.json's "attention" (kind, tile, window, block, head_windows); the student bundle
    # keeps it. None: dense. The real and fake scores stay dense.
    attention: dict | None = None
    # with `attention` or precision "fp8": the student first learns to compute again what it computed
    # dense and in fp32 (distill/adapt.py), pattern / FP8 on, for `adapt_steps` steps at `adapt_lr`,
    # then takes the DMD steps; 0: no adaptation. With adaptation, `steps` may be 0 (adaptation only)
    adapt_steps: int = 0
    adapt_lr: float = 1e-4
    # "constant" adapt_lr, or "cosine": decayed from adapt_lr to a tenth of it over adapt_steps
    adapt_schedule: str = "constant"
    # "fp8": quantisation-aware, the student trains with FP8's numerics in its forward (block linears
    # and self-attention through model.precision.fake_fp8; gradients straight through the roundings),
    # for a student meant to run with precision="fp8"; the CPU's reference numerics (no CUDA yet)
    precision: str = "bf16"
    # a student bundle (path or shipped name) the student starts from instead of the pruned
    # Stage II network: a continuation of an existing student (e.g. sparse-aware or FP8-aware
    # fine-tuning). Its blocks are its own (no plan is applied); the real score is the teacher
    # with plain CFG ("cfg"), the fake score starts from the teacher.
    init_student: str | None = None

    _ADDED_LATER: ClassVar[tuple[str, ...]] = ("attention", "init_student", "adapt_steps", "adapt_lr", "precision",
                                               "adapt_schedule", "data_denoise", "data_denoise_steps", "data_denoise_norm",
                                               "gan", "gan_fake", "gan_lr", "gan_t_max", "gan_layer", "dmd")

    def __post_init__(self) -> None:
        def need(cond: bool, key: str, what: str) -> None:
            if not cond:
                raise ConfigError(f"stage3.{key} must be {what}, got {getattr(self, key)!r}")

        need(self.init_student is None or (isinstance(self.init_student, str) and self.real_score == "cfg"),
             "init_student", 'null, or a student bundle with real_score "cfg" (the well-guided score needs Stage II)')
        if self.attention is not None:
            if isinstance(self.attention, AttentionConfig):
                self.attention = self.attention.to_dict()
            need(isinstance(self.attention, dict), "attention", "an object (kind, tile, window, block, head_windows) or null")
            dataclass_from_dict(AttentionConfig, self.attention, "stage3.attention")  # checked now, not mid-run

        need(isinstance(self.adapt_steps, int) and not isinstance(self.adapt_steps, bool) and self.adapt_steps >= 0,
             "adapt_steps", "an integer >= 0")
        need(self.adapt_steps == 0 or self.attention is not None or self.precision == "fp8", "adapt_steps",
             "0 unless the student runs differently from its dense self (stage3.attention or precision fp8)")
        need(isinstance(self.adapt_lr, (int, float)) and math.isfinite(self.adapt_lr) and self.adapt_lr > 0,
             "adapt_lr", "> 0")
        need(self.adapt_schedule in ADAPT_SCHEDULES, "adapt_schedule", f"one of {', '.join(ADAPT_SCHEDULES)}")
        need(self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}")
        need(self.precision == "bf16" or self.device == "cpu", "precision",
             '"bf16" on CUDA (FP8-aware training runs the reference numerics, on the CPU)')
        for key in ("steps", "batch_size", "fake_updates", "num_steps", "checkpoint_every", "eval_every"):
            least = 0 if key == "steps" and self.adapt_steps else 1  # adaptation alone: no DMD steps
            need(isinstance(getattr(self, key), int) and getattr(self, key) >= least, key, f"an integer >= {least}")
        for key in ("lr_student", "lr_fake", "shift", "t_shift"):
            need(math.isfinite(getattr(self, key)) and getattr(self, key) > 0, key, "> 0")
        need(self.real_score in REAL_SCORES, "real_score", f"one of {REAL_SCORES}")
        need(isinstance(self.prune, bool), "prune", "true or false")
        need(isinstance(self.fsdp, bool), "fsdp", "true or false")
        for key in ("b1_range", "b2_range"):
            r = getattr(self, key)
            need(isinstance(r, (list, tuple)) and len(r) == 2 and all(math.isfinite(v) for v in r) and r[0] <= r[1],
                 key, "[low, high] with low <= high")
        need(0 < self.t_min < self.t_max < 1, "t_min", "in (0, t_max) with t_max < 1")
        need(self.ema_decay is None or (isinstance(self.ema_decay, (int, float)) and 0 < self.ema_decay < 1),
             "ema_decay", "null or in (0, 1)")
        need(isinstance(self.dmd, (int, float)) and not isinstance(self.dmd, bool) and math.isfinite(self.dmd)
             and self.dmd >= 0, "dmd", "a number >= 0")
        need(self.dmd > 0 or self.data_denoise > 0 or self.regression > 0 or self.gan > 0, "dmd",
             "> 0 unless another term trains the student (data_denoise, regression or gan > 0)")
        need(isinstance(self.regression, (int, float)) and math.isfinite(self.regression) and self.regression >= 0,
             "regression", "a number >= 0")
        need(isinstance(self.data_denoise, (int, float)) and math.isfinite(self.data_denoise)
             and self.data_denoise >= 0, "data_denoise", "a number >= 0")
        need(self.data_denoise_steps is None or (
            isinstance(self.data_denoise_steps, list) and len(self.data_denoise_steps) > 0
            and all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < self.num_steps
                    for k in self.data_denoise_steps)),
             "data_denoise_steps", f"null or a non-empty list of student steps in 0..{self.num_steps - 1}")
        need(self.data_denoise_norm in DENOISE_NORMS, "data_denoise_norm", f"one of {', '.join(DENOISE_NORMS)}")
        for key in ("gan", "gan_fake"):
            v = getattr(self, key)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0, key,
                 "a number >= 0")
        need(self.gan_lr is None or (isinstance(self.gan_lr, (int, float)) and math.isfinite(self.gan_lr)
                                     and self.gan_lr > 0), "gan_lr", "null or > 0")
        need(isinstance(self.gan_t_max, (int, float)) and 0 < self.gan_t_max <= 1, "gan_t_max", "in (0, 1]")
        need(self.gan_layer is None or (isinstance(self.gan_layer, int) and not isinstance(self.gan_layer, bool)
                                        and self.gan_layer >= 0), "gan_layer", "null or a block index >= 0")
        need(not (self.fsdp and self.gan > 0), "gan", "0 with fsdp (not supported yet)")
        need(not (self.fsdp and self.ema_decay is not None), "ema_decay", "null with fsdp (not supported yet)")
        need(self.low_noise_b1 is None or (isinstance(self.low_noise_b1, (int, float))
                                           and math.isfinite(self.low_noise_b1) and self.low_noise_b1 >= 0),
             "low_noise_b1", "null or a number >= 0")

    def sigmas(self) -> list[float]:
        return euler_sigmas(self.num_steps, self.shift)[:-1].tolist()  # the trailing 0 is not a step

    @classmethod
    def added_later(cls) -> dict:
        """The keys added after the first Stage III runs, at their defaults (which compute what a
        run from before them computed): such a run's checkpoint resumes with them at those values."""
        return {k: v for k, v in cls().to_dict().items() if k in cls._ADDED_LATER}

    def denoise_steps(self) -> list[int]:
        """The student steps whose sigma `data_denoise` noises the data to."""
        return list(range(1, self.num_steps)) if self.data_denoise_steps is None else list(self.data_denoise_steps)


# ---- the pieces -------------------------------------------------------------------------------

@torch.no_grad()
def student_state(student, noise: torch.Tensor, context: torch.Tensor, sigmas: list[float], k: int,
                  gen: torch.Generator, draw: Callable[[tuple], torch.Tensor] | None = None) -> torch.Tensor:
    """The few-step sampler's state at its step `k` (0-based) from `noise`: steps 0..k-1 run
    without gradients (x0 = x - s_i v, re-noised to the next sigma). `draw(shape)` makes the
    re-noising noise (default: `torch.randn` from `gen`; distributed runs draw the global
    batch's and slice)."""
    draw = draw or _randn_from(gen)
    x = noise
    for i in range(k):
        v = student(x, torch.full((x.shape[0],), 1000 * sigmas[i], device=x.device), context)
        x0 = x - sigmas[i] * v
        eps = draw(tuple(x.shape)).to(x.device)
        x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * eps
    return x


def student_x0(student, noise: torch.Tensor, context: torch.Tensor, sigmas: list[float], k: int,
               gen: torch.Generator, draw: Callable[[tuple], torch.Tensor] | None = None) -> torch.Tensor:
    """Backward simulation: the student's x0 prediction at its step `k` (0-based), reached by
    student_state; gradients flow through the last step only."""
    x = student_state(student, noise, context, sigmas, k, gen, draw)
    v = student(x, torch.full((x.shape[0],), 1000 * sigmas[k], device=x.device), context)
    return x - sigmas[k] * v


@torch.no_grad()
def real_velocity(real: DiT, drop: list[int], x_t, T, context, uncond, b1: float | torch.Tensor, b2: float,
                  mode: str, cond=None) -> torch.Tensor:
    """The real score's velocity. mode "well-guided": v_p(u) + b1 (v_p(c) - v_p(u)) + b2 (v_u(c) - v_p(c))
    with p = `real` with the blocks `drop` skipped, u = `real` in full; "cfg": v(u) + b1 (v(c) - v(u)).
    b1: a number, or per sample (B, 1, 1, 1, 1). `cond`: an image-to-video batch's condition
    (data.conditioned); guidance drops the prompt, never the image."""
    B = x_t.shape[0]
    unc = uncond.expand(B, -1, -1)
    run = conditioned(real, cond)
    if mode == "cfg":
        v_c, v_u = run(torch.cat([x_t, x_t]), torch.cat([T, T]), torch.cat([context, unc])).chunk(2)
        return v_u + b1 * (v_c - v_u)
    with skip_blocks(real, drop):
        vp_c, vp_u = run(torch.cat([x_t, x_t]), torch.cat([T, T]), torch.cat([context, unc])).chunk(2)
    vu_c = run(x_t, T, context)
    return vp_u + b1 * (vp_c - vp_u) + b2 * (vu_c - vp_c)


def data_denoise_loss(student, x0: torch.Tensor, context: torch.Tensor, sigmas: list[float], steps: list[int],
                      gen: torch.Generator, cond=None, draw: Callable[[tuple], torch.Tensor] | None = None,
                      norm: str = "mse") -> torch.Tensor:
    """mse(x0_hat, x0) (`norm` "l1": mean |x0_hat - x0|): the clean clips x0 (B, C, F, H, W) noised
    to the sigma of a student step k drawn from `steps`, x_t = (1 - s_k) x0 + s_k eps, and the
    student's x0 from there, x0_hat = x_t - s_k v(x_t, 1000 s_k). `student` is called as the
    stages call it (conditioned); with an image condition the given frame is put back first (it
    costs nothing)."""
    draw = draw or _randn_from(gen)
    s = sigmas[steps[int(torch.randint(len(steps), (), generator=gen))]]
    eps = draw(tuple(x0.shape)).to(x0.device)
    x_t = (1 - s) * x0 + s * eps
    x0_hat = x_t - s * student(x_t, torch.full((x0.shape[0],), 1000 * s, device=x0.device), context)
    if cond is not None:
        x0_hat = cond.finish(x0_hat)
    return F.mse_loss(x0_hat, x0) if norm == "mse" else F.l1_loss(x0_hat, x0)


def dmd_loss(x: torch.Tensor, x0_fake: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """0.5 || x - stopgrad(x - g) ||^2 (mean), g = (x0_fake - x0_real) / mean|x - x0_real| per sample:
    its gradient w.r.t. x is g / numel, pointing from the real towards the fake distribution."""
    dims = tuple(range(1, x.dim()))
    weight = (x.detach() - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-6)  # (B, 1, 1, 1, 1)
    g = (x0_fake - x0_real) / weight
    return 0.5 * F.mse_loss(x, (x.detach() - g).detach())


def select(evals: list[dict]) -> dict:
    """The checkpoint to keep from `evals` ([{"step", "metrics"}], metrics with adherence,
    frechet, motion_ratio and videos, the number of videos scored): among those with motion
    within 15% of the true speed (all, if none is), the ones whose adherence is within one
    standard error sqrt(a (1 - a) / videos) of the best adherence a; for an image-to-video
    student (metrics with appearance_kept) of those the ones whose appearance kept is within one
    standard error of theirs the best; of those the lowest Frechet distance (ties: the higher
    adherence)."""
    if not evals:
        raise ValueError("select: no evaluations")
    pool = [e for e in evals if abs(e["metrics"].get("motion_ratio", 1.0) - 1.0) <= 0.15] or list(evals)
    videos = pool[0]["metrics"].get("videos")  # unknown: the best alone is close

    def close_to_best(among: list[dict], key: str) -> list[dict]:
        best = max(e["metrics"][key] for e in among)
        se = math.sqrt(best * (1 - best) / videos) if videos else 0.0
        return [e for e in among if e["metrics"][key] >= best - se - 1e-12]

    close = close_to_best(pool, "adherence")
    if all("appearance_kept" in e["metrics"] for e in close):
        close = close_to_best(close, "appearance_kept")
    return min(close, key=lambda e: (e["metrics"].get("frechet", 0.0), -e["metrics"]["adherence"]))


# ---- the loop -----------------------------------------------------------------------------------

def train_stage3(real: DiT, plan: PruningPlan | None, data, cfg: Stage3Config, out: str | Path,
                 evaluate: Callable[[DiT], dict] | None = None, init: DiT | None = None,
                 regression_target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 progress: bool = True, student_init: DiT | None = None) -> tuple[DiT, dict]:
    """Runs (or resumes) Stage III in `out`; returns the best student (by `evaluate`'s metrics
    when given, else the last) and a provenance record.

    real: the real-score network (Stage II network, or the teacher for "cfg" baselines);
    plan: the blocks to remove (None or prune false: a full-size student);
    init: the network the student and fake score start from (default `real`);
    student_init: a network the student starts from instead (a continuation; no plan applied);
    regression_target: (noise, context) -> the teacher's sample from that noise (needed when
    cfg.regression > 0).
    """
    if cfg.regression > 0 and regression_target is None:
        raise ValueError("stage3.regression > 0 needs a regression_target (the teacher's few-step sampler)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.real_score == "well-guided" and plan is None:
        raise ValueError("the well-guided real score mixes the pruned and full modes: it needs a plan")
    init = real if init is None else init
    real = copy.deepcopy(real).to(cfg.device).eval().requires_grad_(False)
    if student_init is not None:
        student = copy.deepcopy(student_init).float()
    else:
        student = (apply_plan(init, plan) if cfg.prune and plan is not None else copy.deepcopy(init))
    student = student.to(cfg.device).train().requires_grad_(True)
    # the student as it runs without a pattern, in fp32: what adaptation teaches it to compute again
    dense = copy.deepcopy(student).eval().requires_grad_(False) if cfg.adapt_steps else None
    if cfg.precision == "fp8":  # quantisation-aware: FP8's numerics in the student's forward
        fake_fp8(student)
    if cfg.attention is not None:  # sparse-aware: the student trains with the pattern it will run with
        student.set_attention(cfg.attention)
    adapt_record = None
    if cfg.adapt_steps:  # first its dense fp32 self's velocity, pattern / FP8 on (distill/adapt.py)
        from .adapt import adapt_student

        student, adapt_record = adapt_student(student, dense, data, cfg, Path(out) / "adapt", progress)
        student.train().requires_grad_(True)
    fake = copy.deepcopy(init).to(cfg.device).train().requires_grad_(True)
    head, gan_layer = None, None  # the adversarial term's realism head on the fake score's trunk
    if cfg.gan > 0:
        if distributed()[1] > 1:
            raise ValueError("stage3.gan with several processes is not supported yet; run it in one process")
        gan_layer = head_layer(len(fake.blocks), cfg.gan_layer)
        with torch.random.fork_rng(devices=[]):  # the same head for the same seed, whatever ran before
            torch.manual_seed(cfg.seed)
            head = RealismHead(fake.config.dim)
        head = head.to(cfg.device).train()
    # FSDP2: a plain copy of the student receives the gathered weights for evaluation and
    # the result; the networks are sharded before the optimisers are made
    template = None
    if cfg.fsdp:
        template = copy.deepcopy(student).eval()
        for net in (real, student, fake):
            fsdp_shard(net)
    opt_g = torch.optim.AdamW(student.parameters(), lr=cfg.lr_student, betas=(0.0, 0.99), weight_decay=0.0)
    fake_params = [{"params": list(fake.parameters())}] + ([] if head is None else [
        {"params": list(head.parameters()), "lr": cfg.lr_fake if cfg.gan_lr is None else cfg.gan_lr}])
    opt_f = torch.optim.AdamW(fake_params, lr=cfg.lr_fake, betas=(0.0, 0.99), weight_decay=0.0)
    recipe = {"stage3": cfg.to_dict(), "plan": None if plan is None else plan.to_dict()}
    modules = {"student": student, "fake": fake, **({} if head is None else {"realism": head})}
    trainer = Trainer(out, modules, {"student": opt_g, "fake": opt_f}, cfg.steps, recipe,
                      runtime=RUNTIME, checkpoint_every=cfg.checkpoint_every, seed=cfg.seed, desc="stage3",
                      progress=progress, ema=None if cfg.ema_decay is None else {"student": cfg.ema_decay},
                      added_later=Stage3Config.added_later())
    if trainer.step > cfg.steps:  # a longer run's checkpoints would be chosen from: not this recipe
        raise ValueError(f"{out} holds a Stage III run at step {trainer.step}, past stage3.steps={cfg.steps}; "
                         f"use a new output directory or steps >= {trainer.step}")
    g_net, f_net = trainer.wrap(student), trainer.wrap(fake)
    sigmas, drop = cfg.sigmas(), ([] if plan is None else plan.drop)
    uncond = data.uncond.to(cfg.device)
    evals_dir = Path(out) / "evals"  # step-NNNNNN.safetensors: the weights of every evaluation

    def plain_student() -> DiT:  # the student as an ordinary network (gathered: every rank calls)
        if cfg.ema_decay is not None:  # its EMA weights (parameters; buffers are the student's)
            net = copy.deepcopy(student)
            net.load_state_dict(trainer.ema_state("student"), strict=False)
            return net
        if not is_sharded(student):
            return student
        template.load_state_dict(full_state_dict(student))
        return template

    def consider(step: int) -> None:  # evaluate on rank 0, keep the weights beside the numbers
        if evaluate is None:
            return
        net = plain_student()
        if trainer.rank != 0:
            return
        net.eval()
        metrics = evaluate(net)
        net.train()
        trainer.log(**{f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        atomic_save_safetensors(evals_dir / f"step-{step:06d}.safetensors", net.state_dict())
        # a resumed run may re-evaluate the step it was killed at
        trainer.extra["evals"] = [e for e in trainer.extra.get("evals", []) if e["step"] != step] + [
            {"step": step, "metrics": metrics}]

    if trainer.step == 0 and "evals" not in trainer.extra:
        consider(0)
    for step in trainer:
        x0_data, context = data.batch(step, cfg.batch_size)
        context = trainer.shard(context.to(cfg.device))
        cond = condition_of(data, x0_data.to(cfg.device), step)  # an image-to-video model's first frames, else None
        cond = None if cond is None else cond.map(trainer.shard)
        B = context.shape[0]
        gen = trainer.gen
        g_cond, f_cond = conditioned(g_net, cond), conditioned(f_net, cond)
        # 1. x = G(z) by backward simulation to a random student step
        k = int(torch.randint(cfg.num_steps, (), generator=gen))
        noise = _draw_global((B, *latent_shape(data)), gen, trainer).to(cfg.device)
        extra, x, f_loss = {}, None, None
        if cfg.dmd > 0 or head is not None:  # dmd 0 without the adversarial term: no sample, no fake score
            x = student_x0(g_cond, noise, context, sigmas, k, gen,
                           draw=lambda shape: _draw_global(shape, gen, trainer))  # (B, C, F, H, W)
            if cond is not None:
                x = cond.finish(x)  # first_frame: frame 0 is the image's (no gradient there); concat: as it is
            # 2. fake score: flow loss on the student's samples, several updates
            for i in range(cfg.fake_updates):
                t, eps = _draw_t_eps(x.shape, cfg, gen, trainer)
                x_t = (1 - t) * x.detach() + t * eps
                f_loss = F.mse_loss(f_cond(x_t, 1000 * t.flatten(), context), eps - x.detach())
                loss = f_loss
                if head is not None and i == 0:  # + the realism head (and trunk): real clips vs the student's
                    t_d, eps_real, eps_fake = _draw_gan_t_eps(x.shape, cfg, gen, 2)
                    real_clips = x0_data.to(cfg.device)
                    d_loss = discriminator_loss(realism_logits(f_cond, fake, head, gan_layer, real_clips, t_d, eps_real, context),
                                                realism_logits(f_cond, fake, head, gan_layer, x.detach(), t_d, eps_fake, context))
                    loss = loss + cfg.gan_fake * d_loss
                    extra["gan_d"] = d_loss.item()
                trainer.update("fake", loss)
        g_loss = torch.zeros((), device=cfg.device)
        if cfg.dmd > 0:  # 3. generator: DMD gradient from the fake and real x0 predictions
            t, eps = _draw_t_eps(x.shape, cfg, gen, trainer)
            b1 = float(torch.empty(()).uniform_(*cfg.b1_range, generator=gen))
            b2 = float(torch.empty(()).uniform_(*cfg.b2_range, generator=gen))
            if cfg.low_noise_b1 is not None and isinstance(real, TwoExpertDiT):  # the low expert's own guidance
                b1 = torch.where(t <= real.boundary, cfg.low_noise_b1, b1)  # (B, 1, 1, 1, 1)
            x_t = (1 - t) * x.detach() + t * eps
            T = 1000 * t.flatten()
            with torch.no_grad():
                x0_fake = x_t - t * conditioned(fake, cond)(x_t, T, context)
                x0_real = x_t - t * real_velocity(real, drop, x_t, T, context, uncond, b1, b2, cfg.real_score, cond)
            g_loss = g_loss + cfg.dmd * dmd_loss(x, x0_fake, x0_real)
        if head is not None:  # the student's samples taken for real: gradients to x only
            t_g, eps_g = _draw_gan_t_eps(x.shape, cfg, gen, 1)
            with frozen(fake, head):
                adv = generator_loss(realism_logits(conditioned(fake, cond), fake, head, gan_layer, x, t_g, eps_g, context))
            g_loss = g_loss + cfg.gan * adv
            extra["gan_g"] = adv.item()
        if cfg.regression > 0:  # the student's first step from z towards the teacher's sample from z
            with torch.no_grad():
                target = regression_target(noise, context) if cond is None else regression_target(noise, context, cond)
            x_first = x if (k == 0 and x is not None) else student_x0(g_cond, noise, context, sigmas, 0, gen)
            if cond is not None:
                x_first = cond.finish(x_first)
            reg = F.mse_loss(x_first, target)
            g_loss = g_loss + cfg.regression * reg
            extra["regression"] = reg.item()
        if cfg.data_denoise > 0:  # a real clip noised to one of the student's sigmas, and back
            den = data_denoise_loss(g_cond, trainer.shard(x0_data.to(cfg.device)), context, sigmas,
                                    cfg.denoise_steps(), gen, cond, draw=lambda shape: _draw_global(shape, gen, trainer),
                                    norm=cfg.data_denoise_norm)
            g_loss = g_loss + cfg.data_denoise * den
            extra["data_denoise"] = den.item()
        grad_norm = trainer.update("student", g_loss)
        if x is not None:  # the student's sample and the fake score's loss, where there were any
            extra.update(k=k, **({} if f_loss is None else {"fake_loss": f_loss.item()}))
        trainer.log(g_loss=g_loss.item(), grad_norm=grad_norm, **extra)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            consider(step + 1)
    seconds = trainer.close()
    student = plain_student()
    # rank 0 evaluated (and wrote) the checkpoints: it chooses, every rank returns the choice
    evals = trainer.extra.get("evals", [])
    best = rank0_decides(select(evals) if evals else None)
    if best is not None:
        chosen = evals_dir / f"step-{best['step']:06d}.safetensors"
        student.load_state_dict(load_safetensors(chosen, str(chosen)))
    record = {"stage": "stage3", "recipe": cfg.to_dict(), "train_seconds": round(seconds, 1), "steps": trainer.step,
              "sigmas": sigmas, "selected": best if best is not None else {"step": trainer.step, "metrics": None},
              "evaluations": evals, **({"adapt": adapt_record} if adapt_record is not None else {})}
    if cfg.precision == "fp8":  # plain Linears again: the bundle is an ordinary model, run with precision="fp8"
        fake_fp8(student, on=False)
    return student.eval().requires_grad_(False), record


def latent_shape(data) -> tuple[int, ...]:
    """(C, F, H, W) of the data's latents (one batch of the stream, cached)."""
    if not hasattr(data, "_latent_shape"):
        x0, _ = data.batch(0, 1)
        data._latent_shape = tuple(x0.shape[1:])
    return data._latent_shape


def _randn_from(gen: torch.Generator) -> Callable[[tuple], torch.Tensor]:
    """Gaussian noise of a shape drawn from `gen` (one process's default draw)."""
    return lambda shape: torch.randn(shape, generator=gen)


def _draw_global(shape: tuple, gen: torch.Generator, trainer: Trainer) -> torch.Tensor:
    """Gaussian noise of this process's `shape` = its slice of the global batch's draw, so
    N processes consume `gen` as one process with the global batch does."""
    return trainer.shard(torch.randn((shape[0] * trainer.world, *shape[1:]), generator=gen))


def _draw_t_eps(shape, cfg: Stage3Config, gen: torch.Generator, trainer: Trainer):
    """t (B, 1, 1, 1, 1) = shift(u), u ~ U(t_min, t_max), and eps, drawn for the global batch, sliced."""
    n = shape[0] * trainer.world
    u = cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(n, generator=gen)
    t = shift_sigmas(u, cfg.t_shift).view(n, 1, 1, 1, 1)
    return trainer.shard(t).to(cfg.device), _draw_global(tuple(shape), gen, trainer).to(cfg.device)


def _draw_gan_t_eps(shape, cfg: Stage3Config, gen: torch.Generator, n_eps: int):
    """The adversarial term's noise (one process only): t (B, 1, 1, 1, 1) ~ U(0, gan_t_max), then
    `n_eps` eps of `shape`."""
    t = (cfg.gan_t_max * torch.rand(shape[0], generator=gen)).view(shape[0], 1, 1, 1, 1)
    return t.to(cfg.device), *(torch.randn(shape, generator=gen).to(cfg.device) for _ in range(n_eps))


def config_from_dict(data: dict, source: str = "stage3") -> Stage3Config:
    return Stage3Config.from_dict({**dataclasses.asdict(Stage3Config()), **data}, source)
