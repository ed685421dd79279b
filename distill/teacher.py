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

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from flgengine.checkpoint import save_bundle
from flgengine.codec import uint8_to_video
from flgengine.config import CodecConfig, ModelConfig, PipelineConfig, SamplerConfig, TextEncoderConfig
from flgengine.model import DiT
from flgengine.sampling import shift_sigmas
from flgengine.text import TokenTextEncoder
from flgengine.worlds import shapes

from .trainer import CHECKPOINT, MetricsLog, check_finite, cosine_lr, ema_update, load_checkpoint, save_checkpoint


@dataclass
class TeacherConfig:
    """Recipe of the shapes teacher (all fields recorded in the bundle's provenance)."""

    steps: int = 900
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 50
    # q/k RMSNorm gains set how sharp attention can get (logits are bounded by the gains
    # once q and k are normalised); at lr ~1e-3 Adam moves them ~1e-3 a step, far too slowly
    # for a short run, so they learn `gain_lr_mult` x faster.
    gain_lr_mult: float = 10.0
    ema_decay: float = 0.995
    cond_dropout: float = 0.1
    # training t = the sampler's shift applied to u ~ U(0, 1): the same noise levels the
    # 50-step sampler visits, high noise included (where the layout of a clip is decided)
    t_shift: float = 2.0
    seed: int = 0
    checkpoint_every: int = 50
    # model: Wan architecture, 8 blocks, width 128, pixels patchified (1, 4, 4): 9 x 8 x 8 = 576 tokens
    num_layers: int = 8
    num_heads: int = 4
    head_dim: int = 32
    ffn_dim: int = 512
    text_dim: int = 64
    freq_dim: int = 64
    max_prompt_words: int = 8
    # sampling defaults written to pipeline.json
    sample_steps: int = 50
    guidance: float = 4.0
    shift: float = 2.0
    threads: int | None = None
    compile: bool = True  # torch.compile the DiT for training: ~1.5x faster steps on CPU after ~2 min
    device: str = "cpu"
    workers: int = 0  # processes rendering batches ahead of the trainer (useful on many-core GPU hosts)

    def model_config(self) -> ModelConfig:
        return ModelConfig(in_channels=3, out_channels=3, patch_size=(1, 4, 4), num_heads=self.num_heads,
                           head_dim=self.head_dim, ffn_dim=self.ffn_dim, text_dim=self.text_dim,
                           freq_dim=self.freq_dim, num_layers=self.num_layers, rope_max_seq_len=64)

    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig(
            text_encoder=TextEncoderConfig(kind="tokens", path="text_encoder", max_length=self.max_prompt_words),
            codec=CodecConfig(kind="pixel"),
            sampler=SamplerConfig(kind="euler", num_steps=self.sample_steps, shift=self.shift, guidance=self.guidance),
            num_frames=shapes.NUM_FRAMES, height=shapes.SIZE, width=shapes.SIZE, fps=8,
        )


def _build(cfg: TeacherConfig) -> tuple[DiT, TokenTextEncoder]:
    torch.manual_seed(cfg.seed)
    return DiT(cfg.model_config()), TokenTextEncoder(list(shapes.VOCAB), cfg.max_prompt_words, cfg.text_dim)


def param_groups(model: DiT, text: TokenTextEncoder, cfg: TeacherConfig) -> list[dict]:
    """AdamW groups: matrices with weight decay; vectors (biases, norm gains, modulation
    tables, embeddings) without; q/k norm gains at `gain_lr_mult` x the learning rate."""
    gains, vectors, matrices = [], [], []
    for name, p in [*model.named_parameters(), *text.named_parameters()]:
        if name.endswith(("norm_q.weight", "norm_k.weight")):
            gains.append(p)
        elif p.dim() < 2 or "modulation" in name or name.startswith(("tok.", "pos.")):
            vectors.append(p)
        else:
            matrices.append(p)
    return [{"params": matrices, "weight_decay": cfg.weight_decay, "lr_mult": 1.0},
            {"params": vectors, "weight_decay": 0.0, "lr_mult": 1.0},
            {"params": gains, "weight_decay": 0.0, "lr_mult": cfg.gain_lr_mult}]


def flow_loss(model: DiT, text: TokenTextEncoder, videos: torch.Tensor, prompts: list[str],
              gen: torch.Generator, cond_dropout: float, t_shift: float = 1.0) -> torch.Tensor:
    """Flow-matching loss on a batch. videos: (B, 3, T, H, W) in [-1, 1]."""
    B = videos.shape[0]
    drop = torch.rand(B, generator=gen) < cond_dropout
    context = text([("" if d else p) for p, d in zip(prompts, drop.tolist())])  # (B, L, text_dim)
    t = shift_sigmas(torch.rand(B, generator=gen), t_shift).to(videos.device)  # (B,) in (0, 1)
    eps = torch.randn(videos.shape, generator=gen).to(videos.device)
    tt = t.view(B, 1, 1, 1, 1)
    x_t = (1 - tt) * videos + tt * eps
    return F.mse_loss(model(x_t, t * 1000, context), eps - videos)


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
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, text = _build(cfg)
    model.to(cfg.device), text.to(cfg.device)
    params = list(model.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(param_groups(model, text, cfg), lr=cfg.lr, betas=(0.9, 0.99))
    ema = {**{f"dit.{k}": p.detach().clone() for k, p in model.named_parameters()},
           **{f"text.{k}": p.detach().clone() for k, p in text.named_parameters()}}
    both = torch.nn.ModuleDict({"dit": model, "text": text})
    step, seconds = 0, 0.0
    ckpt = out / CHECKPOINT
    if ckpt.exists():
        state = load_checkpoint(ckpt)
        runtime = ("threads", "compile", "checkpoint_every", "device", "workers")  # how it runs, not what it computes
        saved = {k: v for k, v in state["config"].items() if k not in runtime}
        if saved != {k: v for k, v in dataclasses.asdict(cfg).items() if k not in runtime}:
            raise ValueError(f"{ckpt} was written by another recipe; use a new --out or the same options")
        both.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        ema = {k: v.to(cfg.device) for k, v in state["ema"].items()}
        torch.set_rng_state(state["rng"])
        step, seconds = state["step"], state["seconds"]
    gen = torch.Generator().manual_seed(cfg.seed)
    if step:
        gen.set_state(state["gen"])
    log = MetricsLog(out / "metrics.jsonl")
    bar = tqdm(total=cfg.steps, initial=step, desc="teacher", unit="step", disable=not progress)
    t_start = time.time() - seconds
    model.train(), text.train()
    net = torch.compile(model) if cfg.compile else model
    batches = iter(_batches(cfg, step))
    while step < cfg.steps:
        x0, prompts = next(batches)
        x0 = x0.to(cfg.device)  # (B, 3, T, H, W)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup) * g["lr_mult"]
        loss = flow_loss(net, text, x0, prompts, gen, cfg.cond_dropout, cfg.t_shift)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        check_finite(step, loss, params, ckpt)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema, both, step, cfg.ema_decay)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 10 == 0:
            log.write(step, loss=loss.item(), grad_norm=grad_norm.item(), lr=opt.param_groups[0]["lr"])
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(ckpt, {"config": dataclasses.asdict(cfg), "step": step, "seconds": time.time() - t_start,
                                   "model": both.state_dict(), "optimizer": opt.state_dict(), "ema": ema,
                                   "rng": torch.get_rng_state(), "gen": gen.get_state()})
    bar.close()
    seconds = time.time() - t_start
    # the bundle holds the EMA weights
    both.load_state_dict(ema)
    recipe = {"recipe": dataclasses.asdict(cfg), "train_seconds": round(seconds, 1), "steps": step,
              "samples": step * cfg.batch_size, "samples_per_hour": round(step * cfg.batch_size / max(seconds, 1e-9) * 3600),
              "machine": (f"{torch.get_num_threads()} CPU threads" if cfg.device == "cpu" else
                          torch.cuda.get_device_name()) + f", torch {torch.__version__}"}
    path = write_bundle(model, text, cfg, Path(bundle) if bundle else out / "bundle", recipe)
    return {"bundle": str(path), **recipe}


def snapshot(out: str | Path, bundle: str | Path) -> Path:
    """Writes a bundle of the EMA weights in `out`'s latest checkpoint (training not resumed)."""
    ckpt = Path(out) / CHECKPOINT
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: no checkpoint to snapshot")
    state = load_checkpoint(ckpt)
    cfg = TeacherConfig(**state["config"])
    model, text = _build(cfg)
    torch.nn.ModuleDict({"dit": model, "text": text}).load_state_dict(state["ema"])
    recipe = {"recipe": state["config"], "train_seconds": round(state["seconds"], 1), "steps": state["step"],
              "samples": state["step"] * cfg.batch_size, "snapshot": True}
    return write_bundle(model, text, cfg, Path(bundle), recipe)


def write_bundle(model: DiT, text: TokenTextEncoder, cfg: TeacherConfig, path: Path, recipe: dict) -> Path:
    text.save(path / "text_encoder")
    provenance = {"kind": "shapes-world teacher", "world": "flgengine.worlds.shapes",
                  "objective": "flow matching, v = eps - x0, shifted-uniform t, condition dropout (CFG)",
                  "stages": [{"stage": "train-teacher", **recipe}]}
    return save_bundle(path, model.eval(), cfg.pipeline_config(), provenance)


def config_from_args(args) -> TeacherConfig:
    fields = {f.name for f in dataclasses.fields(TeacherConfig)}
    return TeacherConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})


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
        if f.name == "compile":
            p.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                           help="do not torch.compile the DiT (slower steps, no compile wait)")
            continue
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=None,
                       help=f"(default {f.default})")
    p.add_argument("--quiet", action="store_true")


def run(args) -> int:
    if args.snapshot:
        print(f"wrote {snapshot(args.out, args.snapshot)}")
        return 0
    result = train_teacher(config_from_args(args), args.out, args.bundle, progress=not args.quiet)
    print(json.dumps(result, indent=2))
    return 0
