"""Pipeline = text encoder -> DiT -> sampler -> codec, all described by a bundle.

    prompts --text_encoder--> context (B, L, text_dim)
    noise (B, C, F', H', W') --sampler(DiT)--> latents --codec.decode--> video (B, 3, T, H, W)
    -> uint8 (B, T, H, W, 3)

Every argument is checked before any compute; errors name the bad value.

The DiT may be a built engine instead (`engine=DIR`, see `flgengine.export`): text
encoder, sampler and codec stay the same. On CUDA a student's whole few-step loop runs
as one captured CUDA graph (`cuda_graph`, see `flgengine.cudagraph`).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from .bundle import BundleError, load_bundle, read_model_config, read_provenance
from .codec import video_to_uint8
from .conditioning import ExtraInputs, check_image_model, image_condition, images_for
from .config import PipelineConfig, SamplerConfig
from .image import fit_image
from .loading import (ASSETS, DEFAULT_MODELS, _build_image_encoder, _build_parts, check_paths_inside,
                      resolve_device, resolve_dtype, resolve_model, shipped_models)
from .sampling import FewStepSampler, build_sampler, randn, shift_sigmas

# the model / device / dtype resolution lives in loading.py; its names are also importable from here
__all__ = ["Pipeline", "ASSETS", "DEFAULT_MODELS", "shipped_models", "resolve_model", "resolve_device", "resolve_dtype",
           "check_paths_inside"]

log = logging.getLogger("flgengine")


def _check_attention_fits(model, codec, cfg: PipelineConfig, path) -> None:
    """A bundle's sparse-attention pattern must fit the token grid of its default size (a tile
    larger than the grid is refused at load, naming the key)."""
    if codec is None or not hasattr(codec, "latent_shape"):
        return
    for dit in (model.high, model.low) if hasattr(model, "low") else (model,):
        if getattr(dit, "sparse", None) is None:
            continue
        latent = codec.latent_shape(cfg.num_frames, cfg.height, cfg.width)
        grid = tuple(n // p for n, p in zip(latent[1:], dit.config.patch_size))
        try:
            dit.sparse.check_grid(grid)
        except ValueError as e:
            raise BundleError(f"{path}/config.json: {e}, at pipeline.json's default size "
                              f"{cfg.num_frames} x {cfg.height} x {cfg.width}") from None


class Pipeline:
    """A runnable model. Exposes `.dit`, `.text_encoder`, `.sampler`, `.codec`, `.config`;
    call it like `flgengine.generate()` without the `model` argument."""

    def __init__(self, dit, text_encoder, codec, config: PipelineConfig, *, device: torch.device,
                 dtype: torch.dtype, path: Path | None = None, provenance: dict | None = None, engine=None,
                 image_encoder=None):
        self.dit, self.text_encoder, self.codec, self.config = dit, text_encoder, codec, config
        self.image_encoder = image_encoder  # CLIP vision encoder of a Wan2.1-I2V bundle, else None
        self.sampler = build_sampler(config.sampler, config.low_noise_boundary)
        self.device, self.dtype, self.path = device, dtype, path
        self.provenance = provenance or {}
        self.engine = engine  # a flgengine.export.Engine running the DiT, or None (PyTorch)
        self._graphs: dict = {}  # captured few-step loops (GraphedFewStepLoop), one per shape
        self.precision = "bf16"  # the DiT's: "bf16" (its dtype) or "fp8" (model/precision.py)
        self.lora = None  # flgengine.lora.LoraReport of the LoRAs loaded with the DiT, or None
        self.parallel: str | None = None  # "sequence" / "cfg": the DiT runs over the process group's ranks
        self.offload: str | None = None  # "blocks": block weights streamed from CPU memory (flgengine/offload.py)

    @classmethod
    def from_bundle(cls, path, *, device=None, dtype=None, backend: str | None = None,
                    engine: str | os.PathLike | None = None, precision: str | None = None,
                    allow_outside_paths: bool = False, lora=None, lora_scale=None, lora_mode: str = "merge",
                    parallel: str | None = None, offload: str | None = None) -> "Pipeline":
        from .model.precision import PRECISIONS, fp8_unavailable
        from .parallel import PARALLEL_KINDS

        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
        if parallel is not None:
            import torch.distributed as dist

            if parallel not in PARALLEL_KINDS:
                raise ValueError(f"parallel={parallel!r} is not one of {', '.join(PARALLEL_KINDS)}")
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(f"parallel={parallel!r} needs an initialised process group: launch with torchrun "
                                 "(the CLI's --parallel then sets it up) or call torch.distributed.init_process_group")
            if engine is not None:
                raise ValueError(f"parallel={parallel!r} runs the PyTorch DiT over several processes; an engine "
                                 f"(engine={str(engine)!r}) runs in one")
        if offload is not None:
            from .offload import OFFLOAD_KINDS

            if offload not in OFFLOAD_KINDS:
                raise ValueError(f"offload={offload!r} is not one of {', '.join(OFFLOAD_KINDS)}")
            if engine is not None:
                raise ValueError(f"offload={offload!r} streams the PyTorch DiT's block weights; an engine "
                                 f"(engine={str(engine)!r}) holds its own")
            if resolve_device(device).type != "cuda":
                raise ValueError(f"offload={offload!r} streams block weights from CPU memory to a GPU; the device is "
                                 f"{resolve_device(device)}: on the CPU the weights are in memory already (drop offload=)")
        path = resolve_model(path)
        if engine is not None and lora is not None:
            raise ValueError(f"lora: an engine (engine={str(engine)!r}) runs the weights it was built from, and a "
                             "LoRA changes them; run without the engine, or export one from a bundle with the LoRA "
                             "merged (save_bundle of the loaded pipeline's dit)")
        if engine is not None:
            return cls._from_engine(path, engine, device=device, dtype=dtype, backend=backend, precision=precision,
                                    allow_outside_paths=allow_outside_paths)
        precision = precision or "bf16"
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if precision == "fp8" and fp8_unavailable(device):
            raise ValueError(fp8_unavailable(device))
        if backend is not None:
            from .ops.registry import requested_backend

            requested_backend(backend)  # validates the name before loading anything
        bundle = load_bundle(path, device=None if offload else device, dtype=dtype, precision=precision, lora=lora,
                             lora_scale=lora_scale, lora_mode=lora_mode)
        if offload is not None:  # blocks in pinned CPU memory, streamed to the GPU one block ahead
            from .offload import enable_block_offload

            enable_block_offload(bundle.model, device)
        bundle.model.backend = backend
        cfg = bundle.pipeline
        if not allow_outside_paths:
            check_paths_inside(path, cfg)
        text, codec = _build_parts(cfg, path, device, dtype)
        _check_attention_fits(bundle.model, codec, cfg, path)
        image_encoder = _build_image_encoder(cfg, path, device, dtype)
        check_image_model(bundle.model, cfg, codec, image_encoder, path)
        pipe = cls(bundle.model, text, codec, cfg, device=device, dtype=dtype, path=path, provenance=bundle.provenance,
                   image_encoder=image_encoder)
        pipe.precision = precision
        pipe.lora = bundle.lora
        pipe.offload = offload
        if parallel is not None:
            from .parallel import set_parallel

            pipe.dit = set_parallel(bundle.model, parallel)
            pipe.parallel = parallel
        return pipe

    @classmethod
    def _from_engine(cls, path: Path, engine_dir, *, device=None, dtype=None, backend=None, precision=None,
                     allow_outside_paths: bool = False) -> "Pipeline":
        """The bundle's text encoder and codec around an engine in the DiT's place; the
        bundle's weights are not loaded, only hashed to check the engine was built from them."""
        from .export.engine import EngineDiT, load_engine

        if backend is not None:
            raise ValueError(f"backend={backend!r} picks the PyTorch DiT's ops; an engine (engine={str(engine_dir)!r}) "
                             "brings its own kernels: drop one of the two")
        eng = load_engine(engine_dir)
        if device is not None and resolve_device(device).type != eng.device.type:
            raise ValueError(f"engine {engine_dir} runs on {eng.device.type}, not {resolve_device(device)}; "
                             "export one for that device")
        if precision is not None and precision != eng.manifest.precision:
            raise ValueError(f"precision={precision!r}: engine {engine_dir} was built in {eng.manifest.precision}; "
                             f"drop precision= to run it, or export one with --precision {precision}")
        if dtype is not None and resolve_dtype(dtype, eng.device) != eng.dtype:
            raise ValueError(f"engine {engine_dir} takes {eng.manifest.dtype}, not {resolve_dtype(dtype, eng.device)}; "
                             "drop dtype= or export one in that dtype")
        device, dtype = eng.device, eng.dtype
        if not (path / "model.safetensors").is_file():
            raise BundleError(f"{path}/model.safetensors: missing (it identifies the weights the engine was built from)")
        config = read_model_config(path)
        cfg = PipelineConfig.from_json(path / "pipeline.json")
        if not allow_outside_paths:
            check_paths_inside(path, cfg)
        eng.check_bundle(path, config)
        text, codec = _build_parts(cfg, path, device, dtype)
        dit = EngineDiT(eng, config)
        image_encoder = _build_image_encoder(cfg, path, device, dtype)
        check_image_model(dit, cfg, codec, image_encoder, path)
        pipe = cls(dit, text, codec, cfg, device=device, dtype=dtype, path=path,
                   provenance=read_provenance(path), engine=eng, image_encoder=image_encoder)
        pipe.precision = eng.manifest.precision
        return pipe

    # -- checks ---------------------------------------------------------------------------
    def _sampler_for(self, steps: int | None, guidance: float | None, force: bool):
        cfg: SamplerConfig = self.config.sampler
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if guidance is not None and not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and guidance >= 0):
            raise ValueError(f"guidance must be a number >= 0, got {guidance!r}")
        if self.config.distilled and not force:
            if steps is not None and steps != cfg.num_steps:
                raise ValueError(f"this student was distilled for {cfg.num_steps} steps, not {steps}; "
                                 "pass force=True (CLI: --force) to run it anyway")
            if guidance is not None and guidance > 1:
                raise ValueError(f"this student has CFG baked in (guidance {cfg.guidance}); guidance={guidance} "
                                 "would apply it twice. Pass force=True (CLI: --force) to run it anyway")
        if steps is None and guidance is None:
            return self.sampler
        if cfg.kind == "fewstep":
            n = steps or cfg.num_steps
            sigmas = cfg.sigmas if n == cfg.num_steps else \
                shift_sigmas(torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1], cfg.shift).tolist()
            return FewStepSampler(sigmas, cfg.num_train_timesteps, cfg.guidance if guidance is None else guidance)
        # guidance= sets every step's scale (a two-expert bundle's low_noise_guidance too)
        return build_sampler(SamplerConfig(kind="euler", num_steps=steps or cfg.num_steps, shift=cfg.shift,
                                           guidance=cfg.guidance if guidance is None else float(guidance),
                                           num_train_timesteps=cfg.num_train_timesteps,
                                           low_noise_guidance=cfg.low_noise_guidance if guidance is None else None),
                             self.config.low_noise_boundary)

    def check(self, prompts, num_frames: int, height: int, width: int) -> list[str]:
        if self.text_encoder is None or self.codec is None:
            raise ValueError(f"bundle {self.path} is DiT-only (pipeline.json names no text encoder or codec); "
                             "it can be distilled or exported but not run by generate()")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompts!r}")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"every prompt must be a string, got {bad[0]!r}")
        for name, v in (("num_frames", num_frames), ("height", height), ("width", width)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.codec.check_frames(num_frames)
        pt, ph, pw = self.dit.config.patch_size
        f = self.codec.latent_shape(num_frames, height, width)[1]
        if f % pt:
            raise ValueError(f"num_frames={num_frames} gives {f} latent frames, not divisible by the temporal patch {pt}")
        for name, v, p in (("height", height, ph), ("width", width, pw)):
            m = self.codec.spatial_factor * p
            if v % m:
                lo, hi = max(m, v - v % m), v - v % m + m
                raise ValueError(f"{name}={v} must be a multiple of {m} (codec factor {self.codec.spatial_factor} x "
                                 f"patch {p}); try {lo} or {hi}")
        latent = self.codec.latent_shape(num_frames, height, width)[1:]
        grid = tuple(n // q for n, q in zip(latent, self.dit.config.patch_size))
        for dit in (self.dit.high, self.dit.low) if hasattr(self.dit, "low") else (self.dit,):
            limit = getattr(getattr(dit, "config", None), "pos_grid", None)
            if limit is not None and any(n > m for n, m in zip(grid, limit)):
                st, ss = self.codec.temporal_factor, self.codec.spatial_factor
                most = ((limit[0] * pt - 1) * st + 1, limit[1] * ph * ss, limit[2] * pw * ss)
                raise ValueError(f"num_frames={num_frames}, height={height}, width={width}: this model's position "
                                 f"table covers at most {most[0]} frames of {most[1]} x {most[2]}")
            if getattr(dit, "sparse", None) is not None:
                dit.sparse.check_grid(grid)
        unknown = getattr(self.text_encoder, "unknown_words", None)
        words = unknown(list(prompts)) if unknown is not None else []
        if words:
            log.warning("flgengine: the text encoder does not know %s; they read as <unk> (it knows: %s)",
                        ", ".join(repr(w) for w in words), ", ".join(self.text_encoder.vocab[2:]))
        return list(prompts)

    # -- run ---------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt, *, image=None, seed: int = 0, num_frames: int | None = None, height: int | None = None,
                 width: int | None = None, steps: int | None = None, guidance: float | None = None,
                 negative_prompt: str | None = None, output: str | os.PathLike | None = None,
                 progress: bool = True, force: bool = False, cuda_graph: bool | None = None) -> torch.Tensor:
        cfg = self.config
        num_frames = cfg.num_frames if num_frames is None else num_frames
        height = cfg.height if height is None else height
        width = cfg.width if width is None else width
        prompts = self.check(prompt, num_frames, height, width)
        images = images_for(self.config.image, image, len(prompts), self.path, cuda_graph)
        sampler = self._sampler_for(steps, guidance, force)
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if output is not None and Path(output).suffix.lower() not in (".mp4", ".gif"):
            raise ValueError(f"output {str(output)!r} must end in .mp4 or .gif")
        B = len(prompts)
        shape = (B, *self.codec.latent_shape(num_frames, height, width))
        dit_batch = 2 * B if sampler.guidance > 1 else B  # CFG runs cond and uncond in one batch
        if self.engine is not None:
            self._check_engine(dit_batch, shape[1:], num_frames, height, width)
        use_graph = self._use_cuda_graph(cuda_graph, sampler)

        # 1. text: (B, L, text_dim) (HunyuanVideo's: its packed text, mask and pooled vector in it)
        context = self.text_encoder.encode(prompts, device=self.device, dtype=self.dtype)
        uncond = None
        if sampler.guidance > 1:
            neg = cfg.negative_prompt if negative_prompt is None else negative_prompt
            uncond = self.text_encoder.encode([neg] * B, device=self.device, dtype=self.dtype)
        dit = self.dit
        if cfg.sampler.embedded_guidance is not None:  # a guidance-distilled DiT reads the scale (x 1000)
            scale = torch.full((B,), cfg.sampler.embedded_guidance * 1000.0, device=self.device, dtype=torch.float32)
            dit = ExtraInputs({"guidance": scale}).model(dit)

        # 2. the image: fitted to the frame, encoded (+ CLIP tokens), put into the DiT's input
        condition = None
        if images is not None:
            frames = torch.stack([fit_image(im, height, width) for im in images])  # (B, 3, H, W) in [-1, 1]
            tokens = self.image_encoder.encode(images).to(self.dtype) if self.image_encoder is not None else None
            condition = image_condition(cfg.image, frames, self.codec, num_frames, self.dit.config.patch_size,
                                        self.device, self.dtype, tokens)
            dit = condition.model(dit)

        # 3. sample latents from seeded noise (drawn on the CPU: same video on every device)
        gen = torch.Generator("cpu").manual_seed(seed)
        noise = randn(shape, gen, self.device, self.dtype)
        if use_graph:
            latents = self._graphed_loop(sampler, noise, context, uncond)(noise, context, uncond, gen)
        else:
            bar = _progress(progress, sampler.num_steps)
            latents = sampler.sample(dit, noise, context, uncond, generator=gen, progress=bar)
        if condition is not None:
            latents = condition.finish(latents)

        # 4. decode to uint8 video (B, T, H, W, 3); with several ranks every one has it, rank 0 writes it
        video = video_to_uint8(self.codec.decode(latents.float()).cpu())
        if output is not None and self._writes():
            from .video import save_video

            out = Path(output)
            for i in range(B):
                p = out if B == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
                save_video(video[i], p, fps=cfg.fps)
        return video

    def _writes(self) -> bool:
        """Whether this process writes outputs: the only one, or rank 0 of a parallel run."""
        if self.parallel is None:
            return True
        import torch.distributed as dist

        return dist.get_rank() == 0

    # -- engines and CUDA graphs -----------------------------------------------------------
    def _check_engine(self, batch: int, latent: tuple, num_frames: int, height: int, width: int) -> None:
        """Refuses, before any compute, a request the engine was not built for."""
        m = self.engine.manifest
        latent = (self.dit.config.in_channels, *latent[1:])  # an image "concat" DiT reads more channels
        if tuple(latent) != m.latent_shape:
            built = (f"{m.video['num_frames']} frames of {m.video['height']}x{m.video['width']}" if m.video
                     else f"latents {m.latent_shape}")
            raise ValueError(f"engine {self.engine.directory} was built for {built}; {num_frames} frames of "
                             f"{height}x{width} need latents {tuple(latent)}: generate at the engine's size or "
                             "export an engine with --frames/--height/--width")
        r = m.dynamic_dims.get("batch")
        lo, hi = (r.min, r.max) if r else (m.input("x").shape[0],) * 2
        if not lo <= batch <= hi:
            raise ValueError(f"engine {self.engine.directory} takes a DiT batch of {lo}..{hi}, this request needs {batch} "
                             "(prompts, doubled with CFG); export with --max-batch")

    def _use_cuda_graph(self, cuda_graph: bool | None, sampler) -> bool:
        """Default: on for students (few-step sampler) running the PyTorch DiT on CUDA."""
        fewstep = isinstance(sampler, FewStepSampler)
        # the graphed loop calls the DiT with (x, t, context) alone
        plain = (self.config.image == "none" and self.config.sampler.embedded_guidance is None and self.parallel is None
                 and self.offload is None)
        if cuda_graph is None:
            return self.device.type == "cuda" and fewstep and self.engine is None and self.config.distilled and plain
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph must be True, False or None, got {cuda_graph!r}")
        if cuda_graph:
            if self.device.type != "cuda":
                raise ValueError(f"cuda_graph=True needs a CUDA device; this pipeline runs on {self.device}")
            if not fewstep:
                raise ValueError("cuda_graph=True captures a student's few-step loop; this pipeline's sampler is "
                                 f"{type(sampler).__name__} (a teacher): run it with cuda_graph=False")
            if self.engine is not None:
                raise ValueError("cuda_graph=True captures the PyTorch DiT; it is not supported with an engine")
            if not plain:
                raise ValueError("cuda_graph=True captures a DiT called with (x, t, context) alone in one process; this "
                                 "model also reads other inputs (an image or a guidance scale), runs over ranks or streams its blocks")
        return cuda_graph

    def _graphed_loop(self, sampler, noise, context, uncond):
        from .cudagraph import GraphedFewStepLoop, graph_key

        key = graph_key(sampler, noise, context, uncond)
        if key not in self._graphs:
            self._graphs[key] = GraphedFewStepLoop(sampler, self.dit, noise, context, uncond)
        return self._graphs[key]


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, total=total, desc="sampling", unit="step", leave=False)
