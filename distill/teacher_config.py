"""The shapes-world teacher's recipe (`TeacherConfig`): training, model, sampling defaults, the
two-expert and image-to-video variants; every field is recorded in the bundle's provenance.
The training itself is distill/teacher.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from flgengine.bundle import STORAGE_DTYPES, read_model_config
from flgengine.config import CodecConfig, ModelConfig, PipelineConfig, SamplerConfig, TextEncoderConfig

from .worlds import shapes


@dataclass
class TeacherConfig:
    """Recipe of the shapes teacher (all fields recorded in the bundle's provenance)."""

    steps: int = 1050
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 60
    # q/k RMSNorm gains set how sharp attention can get (logits are bounded by the gains
    # once q and k are normalised); at lr ~1e-3 Adam moves them ~1e-3 a step, far too slowly
    # for a short run, so they learn `gain_lr_mult` x faster.
    gain_lr_mult: float = 10.0
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    # training t = the sampler's shift applied to u ~ U(0, 1): the same noise levels the
    # 50-step sampler visits, high noise included (where the layout of a clip is decided)
    t_shift: float = 2.0
    seed: int = 0
    checkpoint_every: int = 50
    # model: Wan architecture, 8 blocks, width 192 (4 heads x 48): at least the 8 x 8 x 3 = 192
    # pixels of a patch, so no direction of a patch's noise is lost in the patch embedding
    num_layers: int = 8
    num_heads: int = 4
    head_dim: int = 48
    ffn_dim: int = 768
    text_dim: int = 64
    freq_dim: int = 64
    max_prompt_words: int = 8
    text_layers: int = 1  # transformer layers over the prompt's words (see TokenTextEncoder)
    pos_embed: bool = True  # absolute position embeddings (see ModelConfig.pos_embed)
    pos_table: bool = True  # one position vector per token (ModelConfig.pos_grid) instead of frame + row + column
    # std of the position embeddings at init. At high noise a token's patch embedding is noise of
    # std ~0.6 per channel; positions drawn at the DiT's default 0.02 are buried under it, so the
    # network cannot tell where a token is and cannot draw anything position-dependent there. The
    # direction of motion is exactly that (the mean clip of "moving left" differs from "moving
    # right" by frame x column): at 0.02 the teacher never learned the direction word (its loss
    # with the direction swapped was the same to 5 digits); at 1.0 it does (docs/distillation.md).
    pos_init_std: float = 1.0
    velocity_skip: float | None = 0.5  # sigma_data of the c_skip(t) * x_t output skip (ModelConfig.velocity_skip)
    # the network predicts x0 (ModelConfig.x0_prediction, the floor on t; needs velocity_skip None).
    # Measured on its own (bench/RESULTS.md, 2026-11-27): clean backgrounds where the velocity output keeps
    # the noise of t ~ 0.3, but the shape jitters from frame to frame (motion 1.47x) and adherence fell to
    # 0.62; off by default. The shipped teacher uses it for its low-noise expert only.
    x0_prediction: float | None = None
    pooled_text: bool = True  # pooled prompt into the timestep embedding (see ModelConfig.pooled_text)
    patch: int = 8  # pixels patchified (1, patch, patch): 9 x 4 x 4 = 144 tokens at 32 px
    zero_init: bool = True  # adaLN-Zero start (see zero_init)
    # sampling defaults written to pipeline.json
    sample_steps: int = 50
    # high-noise CFG scale written to pipeline.json. The shipped shapes teacher (bench/RESULTS.md, 2026-11-28):
    # 3 read adherence 0.950 but motion 1.16x; 2.5 read 0.933 / 1.13x and FD 324 (495 at 3)
    guidance: float = 2.5
    shift: float = 2.0
    # CFG scale of the steps at t <= boundary (Wan2.2's guidance_scale_2), written to pipeline.json by
    # the low-noise expert run: its job is cleaning, and CFG there cost FD (350 at 1 vs 523 at 3); None = guidance
    low_noise_guidance: float | None = 1.0
    threads: int | None = None
    compile: bool = False  # torch.compile the DiT for training (no gain measured at 144 tokens on 2 cores)
    device: str = "cpu"
    # the bundle's weights are stored in this dtype (float16 halves the file, int8 quarters it,
    # int4 stores the linears in about a seventh: flgengine/storage.py); they load in fp32 as always
    storage_dtype: str = "float16"
    workers: int = 0  # processes rendering batches ahead of the trainer (useful on many-core GPU hosts)
    # -- two-expert teacher (Wan2.2's high-/low-noise split by a timestep boundary) --
    # A bundle path: train the low-noise expert of that (high-noise) teacher instead of a teacher:
    # its DiT starts from the teacher's weights with the x0 output (ModelConfig.x0_prediction, floor
    # `x0_prediction` or 0.05) in place of the velocity skip, its text encoder is the teacher's,
    # frozen (both experts read the same context), and training t covers (0, t_max] only. The final
    # bundle is the teacher with this expert added under low_noise/, used for t <= `boundary`.
    expert_of: str | None = None
    t_max: float = 1.0  # training t = t_max * shift(u): the noise levels this run learns
    boundary: float = 0.2  # sampling switches to the low-noise expert at t <= boundary (pipeline.json)
    # -- image to video: the first frame is given (pipeline.json `image`) --
    # "concat": the DiT reads the noisy clip, a mask (1 on frame 0) and the first frame then zeros,
    # 3 + 1 + 3 channels; "first_frame": frame 0 is the clean frame itself, its tokens at t = 0
    # (one timestep per token), the loss on the other frames; "none": text to video
    image: str = "none"
    # a bundle to start from (its main DiT and text encoder; a two-expert bundle's high-noise DiT):
    # with image "concat" its patch embedding gets the 4 new input channels at zero, so the run starts
    # as that model exactly and learns to read the image. Architecture options come from it.
    init_from: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.t_max, (int, float)) and 0 < self.t_max <= 1):
            raise ValueError(f"t_max must be in (0, 1], got {self.t_max!r}")
        if not (isinstance(self.boundary, (int, float)) and 0 < self.boundary < 1):
            raise ValueError(f"boundary must be in (0, 1), got {self.boundary!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.storage_dtype!r}")
        if self.expert_of and not (Path(self.expert_of) / "config.json").is_file():
            raise ValueError(f"expert_of {self.expert_of!r} is not a bundle directory (no config.json)")
        if self.image not in ("none", "concat", "first_frame"):
            raise ValueError(f"image must be none, concat or first_frame, got {self.image!r}")
        if self.init_from is not None and self.expert_of:
            raise ValueError("init_from and expert_of exclude each other (a low-noise expert starts from expert_of)")
        if self.init_from is not None:
            from flgengine.pipeline import resolve_model

            self.init_from = str(resolve_model(self.init_from))  # a bundle path or a shipped model's name
            if not (Path(self.init_from) / "config.json").is_file():
                raise ValueError(f"init_from {self.init_from!r} is not a bundle directory (no config.json)")

    def model_config(self) -> ModelConfig:
        if self.init_from:
            c = read_model_config(self.init_from)
            return dataclasses.replace(c, in_channels=2 * c.out_channels + 1 if self.image == "concat" else c.in_channels,
                                       attention=None)
        if self.expert_of:
            return dataclasses.replace(read_model_config(self.expert_of), velocity_skip=None,
                                       x0_prediction=self.x0_prediction or 0.05)
        return ModelConfig(in_channels=7 if self.image == "concat" else 3, out_channels=3, patch_size=(1, self.patch, self.patch), num_heads=self.num_heads,
                           head_dim=self.head_dim, ffn_dim=self.ffn_dim, text_dim=self.text_dim,
                           freq_dim=self.freq_dim, num_layers=self.num_layers, rope_max_seq_len=64,
                           pos_embed=self.pos_embed, pooled_text=self.pooled_text, velocity_skip=self.velocity_skip,
                           x0_prediction=self.x0_prediction,
                           pos_grid=(shapes.NUM_FRAMES, shapes.SIZE // self.patch, shapes.SIZE // self.patch)
                           if self.pos_embed and self.pos_table else None)

    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig(
            text_encoder=TextEncoderConfig(kind="tokens", path="text_encoder", max_length=self.max_prompt_words),
            codec=CodecConfig(kind="pixel"),
            sampler=SamplerConfig(kind="euler", num_steps=self.sample_steps, shift=self.shift, guidance=self.guidance),
            num_frames=shapes.NUM_FRAMES, height=shapes.SIZE, width=shapes.SIZE, fps=8,
            image=self.image,
        )


RUNTIME = ("threads", "compile", "checkpoint_every", "device", "workers", "storage_dtype")  # how a run runs, not what it computes
