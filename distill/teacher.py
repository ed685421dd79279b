"""Training the shapes-world teacher: our Wan-architecture DiT + the learned token text
encoder, flow matching with condition dropout (for CFG), EMA weights, on the CPU.

    python -m distill train-teacher --out runs/teacher            # resumes if interrupted
    python -m distill train-teacher --out runs/teacher --bundle flgengine/assets/shapes-teacher

Loss: x_t = (1 - t) x0 + t eps, v = eps - x0, L = || f(x_t, 1000 t, c) - v ||^2 with
t = shift(u), u ~ U(0, 1) (the sampler's shift, so training covers the noise levels the
sampler visits) and c = "" with probability `cond_dropout`. Data comes from
`worlds.shapes.batch(seed, step, batch_size)`, so the step counter is the whole data
stream state and a resumed run sees the same batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from flgengine.bundle import (LOW_NOISE_DIR, load_bundle, read_provenance, storage_dtype_of, bundle_directory,
                              write_bundle_files)
from flgengine.codec import uint8_to_video
from flgengine.config import PipelineConfig
from flgengine.model import DiT, main_expert
from flgengine.sampling import shift_sigmas
from flgengine.text import TokenTextEncoder

from .checkpoint import CHECKPOINT, load_checkpoint
from .teacher_config import RUNTIME, TeacherConfig
from .data import clip_condition, conditioned
from .trainer import Trainer, cosine_lr
from .worlds import shapes


def _build(cfg: TeacherConfig) -> tuple[DiT, TokenTextEncoder]:
    torch.manual_seed(cfg.seed)
    if cfg.init_from:  # a bundle's main DiT (+ zero weights for the image channels) and its text encoder
        start = main_expert(load_bundle(cfg.init_from, dtype=torch.float32).model)
        model = DiT(cfg.model_config())
        state = start.state_dict()
        w = state["patch_embed.weight"]  # (D, C, pt, ph, pw)
        if model.patch_embed.weight.shape[1] != w.shape[1]:
            wide = torch.zeros_like(model.patch_embed.weight)
            wide[:, : w.shape[1]] = w
            state["patch_embed.weight"] = wide
        model.load_state_dict(state)
        return model.requires_grad_(True), TokenTextEncoder.load(Path(cfg.init_from) / "text_encoder")
    if cfg.expert_of:  # the low-noise expert: the teacher's weights under the x0 output, its text encoder frozen
        high = load_bundle(cfg.expert_of, dtype=torch.float32).model
        if not isinstance(high, DiT):
            raise ValueError(f"expert_of {cfg.expert_of!r} already has a low-noise expert: name a one-DiT teacher")
        model = DiT(cfg.model_config())
        model.load_state_dict(high.state_dict())
        text = TokenTextEncoder.load(Path(cfg.expert_of) / "text_encoder").requires_grad_(False)
        return model.requires_grad_(True), text
    model = DiT(cfg.model_config())
    if cfg.pos_embed:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith("pos_"):
                    p.normal_(0.0, cfg.pos_init_std)
    if cfg.zero_init:
        zero_init(model)
    return model, TokenTextEncoder(list(shapes.VOCAB), cfg.max_prompt_words, cfg.text_dim, cfg.text_layers)


@torch.no_grad()
def zero_init(model: DiT) -> DiT:
    """adaLN-Zero start (DiT, Peebles & Xie): every residual branch's gate is 0 and the
    output projection is 0, so the untrained network is the identity on its token stream
    and predicts v = 0. Gates are chunks 2 and 5 of `modulation + time_proj(temb)`; the
    cross-attention output projection is zeroed too, so text enters through a branch
    that starts closed and opens as it helps."""
    D = model.config.dim
    for chunk in (2, 5):  # gate_sa, gate_ff
        model.time_proj.weight[chunk * D:(chunk + 1) * D].zero_()
        model.time_proj.bias[chunk * D:(chunk + 1) * D].zero_()
        for block in model.blocks:
            block.modulation[chunk].zero_()
    for block in model.blocks:
        block.cross_attn.o.weight.zero_()
        block.cross_attn.o.bias.zero_()
    model.head.proj.weight.zero_()
    model.head.proj.bias.zero_()
    return model


def param_groups(model: DiT, text: TokenTextEncoder, cfg: TeacherConfig) -> list[dict]:
    """AdamW groups: matrices with weight decay; vectors (biases, norm gains, modulation
    tables, embeddings) without; q/k norm gains at `gain_lr_mult` x the learning rate."""
    gains, vectors, matrices = [], [], []
    for name, p in [*model.named_parameters(), *text.named_parameters()]:
        if name.endswith(("norm_q.weight", "norm_k.weight")):
            gains.append(p)
        elif p.dim() < 2 or "modulation" in name or name.startswith(("tok.", "pos.", "pos_")):
            vectors.append(p)
        else:
            matrices.append(p)
    return [{"params": matrices, "weight_decay": cfg.weight_decay, "lr_mult": 1.0},
            {"params": vectors, "weight_decay": 0.0, "lr_mult": 1.0},
            {"params": gains, "weight_decay": 0.0, "lr_mult": cfg.gain_lr_mult}]


def flow_loss(model: DiT, text: TokenTextEncoder, videos: torch.Tensor, prompts: list[str],
              gen: torch.Generator, cond_dropout: float, t_shift: float = 1.0, t_max: float = 1.0,
              image: str = "none", patch: tuple[int, int, int] = (1, 1, 1)) -> torch.Tensor:
    """Flow-matching loss on a batch. videos: (B, 3, T, H, W) in [-1, 1]. `image` "concat": the
    model also reads the first frame (first_frame_condition); "first_frame": frame 0 is given
    clean with its tokens at t = 0 (`patch`: the DiT's, to count them) and the loss covers the
    other frames. Dropout drops the prompt only."""
    B = videos.shape[0]
    drop = torch.rand(B, generator=gen) < cond_dropout
    context = text([("" if d else p) for p, d in zip(prompts, drop.tolist())])  # (B, L, text_dim)
    t = t_max * shift_sigmas(torch.rand(B, generator=gen), t_shift).to(videos.device)  # (B,) in (0, t_max)
    eps = torch.randn(videos.shape, generator=gen).to(videos.device)
    tt = t.view(B, 1, 1, 1, 1)
    x_t = (1 - tt) * videos + tt * eps
    target = eps - videos
    v = conditioned(model, clip_condition(videos, image, patch))(x_t, t * 1000, context)
    if image == "first_frame":  # frame 0 is given: no loss there
        return F.mse_loss(v[:, :, 1:], target[:, :, 1:])
    return F.mse_loss(v, target)


class _WorldBatches(torch.utils.data.Dataset):
    """Batch i of the training stream (random access, so resuming is exact)."""

    def __init__(self, cfg: TeacherConfig, start: int):
        self.cfg, self.start = cfg, start

    def __len__(self) -> int:
        return self.cfg.steps - self.start

    def __getitem__(self, i: int):
        videos, prompts, _ = shapes.batch(self.cfg.seed, self.start + i, self.cfg.batch_size)
        return uint8_to_video(torch.from_numpy(videos)), prompts


def _batches(cfg: TeacherConfig, start: int):
    data = _WorldBatches(cfg, start)
    if cfg.workers <= 0:
        return (data[i] for i in range(len(data)))
    return torch.utils.data.DataLoader(data, batch_size=None, num_workers=cfg.workers, prefetch_factor=4)


def train_teacher(cfg: TeacherConfig, out: str | Path, bundle: str | Path | None = None, progress: bool = True) -> dict:
    """Trains (or resumes) in `out`; writes the final bundle to `bundle` (default out/bundle)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, text = _build(cfg)
    model.to(cfg.device), text.to(cfg.device)
    groups = [{**g, "lr": cfg.lr * g["lr_mult"]} for g in param_groups(model, text, cfg)]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))
    trainer = Trainer(out, {"dit": model, "text": text}, {"main": opt}, cfg.steps, dataclasses.asdict(cfg),
                      runtime=RUNTIME, checkpoint_every=cfg.checkpoint_every, ema={"dit": cfg.ema_decay, "text": cfg.ema_decay},
                      schedule=lambda step: cosine_lr(step, cfg.steps, 1.0, cfg.warmup), seed=cfg.seed,
                      desc="teacher", progress=progress)
    model.train(), text.train()
    net = trainer.wrap(torch.compile(model) if cfg.compile else model)
    batches = iter(_batches(cfg, trainer.step))
    for step in trainer:
        x0, prompts = next(batches)
        x0 = x0.to(cfg.device)  # (B, 3, T, H, W)
        loss = flow_loss(net, text, x0, prompts, trainer.gen, cfg.cond_dropout, cfg.t_shift, cfg.t_max, cfg.image,
                         model.config.patch_size)
        grad_norm = trainer.update("main", loss)
        trainer.log(loss=loss.item(), grad_norm=grad_norm, lr=opt.param_groups[0]["lr"])
    seconds = trainer.close()
    # the bundle holds the EMA weights
    model.load_state_dict(trainer.ema_state("dit"))
    text.load_state_dict(trainer.ema_state("text"))
    step = trainer.step
    recipe = {"recipe": dataclasses.asdict(cfg), "train_seconds": round(seconds, 1), "steps": step,
              "samples": step * cfg.batch_size, "samples_per_hour": round(step * cfg.batch_size / max(seconds, 1e-9) * 3600),
              "machine": (f"{torch.get_num_threads()} CPU threads" if cfg.device == "cpu" else
                          torch.cuda.get_device_name()) + f", torch {torch.__version__}"}
    path = write_bundle(model, text, cfg, Path(bundle) if bundle else Path(out) / "bundle", recipe)
    return {"bundle": str(path), **recipe}


def snapshot(out: str | Path, bundle: str | Path, storage_dtype: str | None = None) -> Path:
    """Writes a bundle of the EMA weights in `out`'s latest checkpoint (training not resumed),
    its weights stored in `storage_dtype` (default: the run's)."""
    ckpt = Path(out) / CHECKPOINT
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: no checkpoint to snapshot")
    state = load_checkpoint(ckpt)
    cfg = TeacherConfig(**{**state["config"], **({"storage_dtype": storage_dtype} if storage_dtype else {})})
    model, text = _build(cfg)
    torch.nn.ModuleDict({"dit": model, "text": text}).load_state_dict(state["ema"])
    step, seconds = state["step"], state["seconds"]
    recipe = {"recipe": state["config"], "train_seconds": round(seconds, 1), "steps": step,
              "samples": step * cfg.batch_size, "samples_per_hour": round(step * cfg.batch_size / max(seconds, 1e-9) * 3600),
              "snapshot": step < cfg.steps}  # False: the finished run's final EMA weights
    return write_bundle(model, text, cfg, Path(bundle), recipe)


def write_bundle(model: DiT, text: TokenTextEncoder, cfg: TeacherConfig, path: Path, recipe: dict) -> Path:
    if cfg.expert_of:
        return write_expert_bundle(model, cfg, path, recipe)
    provenance = {"kind": "shapes-world teacher", "world": "distill.worlds.shapes",
                  "objective": "flow matching, v = eps - x0, shifted-uniform t, condition dropout (CFG)",
                  "stages": [{"stage": "train-teacher", **recipe}]}
    with bundle_directory(path) as tmp:
        text.save(tmp / "text_encoder")
        write_bundle_files(tmp, model.eval(), cfg.pipeline_config(), provenance,
                           storage_dtype=storage_dtype_of(cfg.storage_dtype))
    return path


def write_expert_bundle(low: DiT, cfg: TeacherConfig, path: Path, recipe: dict) -> Path:
    """The two-expert bundle: the teacher `cfg.expert_of` (its DiT runs t > boundary) and `low`
    in path/low_noise (t <= boundary), both stored in `cfg.storage_dtype`, the boundary and this
    run's `guidance` / `low_noise_guidance` in pipeline.json, the teacher's text encoder and
    provenance with this run's stage added."""
    high = Path(cfg.expert_of)
    storage = storage_dtype_of(cfg.storage_dtype)
    provenance = read_provenance(high)
    for key in ("weights_sha256", "num_params", "storage_dtype", "created", "flgengine_version"):
        provenance.pop(key, None)  # save_bundle writes them anew
    provenance.pop("evaluation", None)  # it measured the teacher alone: `distill evaluate --write-provenance` anew
    provenance["kind"] = "shapes-world teacher, two experts (high / low noise)"
    provenance["stages"] = [*provenance.get("stages", []),
                            {"stage": "train-low-noise-expert", "boundary": cfg.boundary, **recipe}]
    provenance["train_seconds_total"] = round(sum(s.get("train_seconds", 0) for s in provenance["stages"]), 1)
    provenance["num_params_low_noise"] = low.num_params()
    pipeline = PipelineConfig.from_json(high / "pipeline.json")
    sampler = dataclasses.replace(pipeline.sampler, guidance=cfg.guidance, low_noise_guidance=cfg.low_noise_guidance)
    pipeline = dataclasses.replace(pipeline, sampler=sampler, low_noise_boundary=cfg.boundary)
    with bundle_directory(path) as tmp:
        write_bundle_files(tmp / LOW_NOISE_DIR, low.eval(), None,
                           {"kind": "low-noise expert of a shapes-world teacher", "high_noise_expert": str(high),
                            "objective": "flow matching at t <= t_max, x0 output (x-prediction, v-loss)",
                            "stages": [{"stage": "train-low-noise-expert", **recipe}]}, storage_dtype=storage)
        TokenTextEncoder.load(high / "text_encoder").save(tmp / "text_encoder")
        write_bundle_files(tmp, load_bundle(high, dtype=torch.float32).model, pipeline, provenance, storage_dtype=storage)
    return path


def config_from_args(args) -> TeacherConfig:
    fields = {f.name for f in dataclasses.fields(TeacherConfig)}
    return TeacherConfig(**{k: (None if v is _NONE else v) for k, v in vars(args).items() if k in fields and v is not None})


_NONE = "none"  # an optional number set to None on the command line (argparse's None means "not given")


def _arg_type(f: dataclasses.Field):
    """The CLI type of a recipe field; optional numbers also take "none" (the field's None)."""
    if "float" in str(f.type) and "None" in str(f.type):
        return lambda v: _NONE if v.lower() == "none" else float(v)
    return type(f.default) if f.default is not None else str


def add_args(p) -> None:
    p.add_argument("--out", required=True, help="run directory: checkpoint, metrics.jsonl (resumes from it)")
    p.add_argument("--bundle", default=None, help="where to write the final bundle (default OUT/bundle)")
    p.add_argument("--snapshot", default=None, metavar="DIR",
                   help="do not train: write a bundle of the latest checkpoint's EMA weights to DIR")
    for f in dataclasses.fields(TeacherConfig):
        if f.name == "threads":
            p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
            continue
        if f.name == "workers":
            p.add_argument("--workers", type=int, default=None, help="data worker processes (default 0)")
            continue
        if f.name == "device":
            p.add_argument("--device", default=None, help="cpu (default) or cuda")
            continue
        if isinstance(f.default, bool):
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, action=argparse.BooleanOptionalAction,
                           default=None, help=f"(default {f.default})")
            continue
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_arg_type(f), default=None,
                       help=f"(default {f.default})")
    p.add_argument("--quiet", action="store_true")


def run(args) -> int:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("train-teacher runs in one process (use --device cuda --workers N on a GPU); "
                         "torchrun is for `python -m distill run|stage2|stage3`")
    if args.snapshot:
        print(f"wrote {snapshot(args.out, args.snapshot, args.storage_dtype)}")
        return 0
    result = train_teacher(config_from_args(args), args.out, args.bundle, progress=not args.quiet)
    print(json.dumps(result, indent=2))
    return 0
