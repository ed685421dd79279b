"""The student bundle around a trained DiT: its few-step pipeline, its evaluation during
training, and how it is written (the teacher's text encoder and codec files beside it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flgengine.bundle import bundle_directory, copy_parts, storage_dtype_of, write_bundle_files
from flgengine.config import PipelineConfig, SamplerConfig

from . import stage3 as s3


def student_pipeline_config(teacher: PipelineConfig, stage3: s3.Stage3Config) -> PipelineConfig:
    """The teacher's pipeline with the student's few-step sampler (no CFG, marked distilled)."""
    sampler = SamplerConfig(kind="fewstep", num_steps=stage3.num_steps, shift=stage3.shift, guidance=0.0,
                            sigmas=stage3.sigmas(), num_train_timesteps=teacher.sampler.num_train_timesteps,
                            embedded_guidance=teacher.sampler.embedded_guidance)
    return dataclasses.replace(teacher, sampler=sampler, distilled=True, low_noise_boundary=None)


def student_evaluator(pipe, pipeline_config: PipelineConfig, evaluate_cfg: dict):
    """evaluate(student DiT) -> flat metrics, with the shapes world's evaluator."""
    from flgengine.pipeline import Pipeline

    from .evaluate import evaluate_bundle
    from .evaluator import load_evaluator

    evaluator = load_evaluator()

    def evaluate(student) -> dict:
        p = Pipeline(student, pipe.text_encoder, pipe.codec, pipeline_config, device=pipe.device, dtype=pipe.dtype,
                     path=None)
        r = evaluate_bundle(p, samples=evaluate_cfg["samples"], seeds=evaluate_cfg["seeds"],
                            batch_size=evaluate_cfg["batch_size"], progress=False, evaluator=evaluator)
        return {"adherence": r["prompt_adherence"]["adherence"], **{k: v for k, v in r["prompt_adherence"].items()
                                                                    if k != "adherence"},
                "motion_ratio": r["motion"]["ratio"], "frechet": r["fd"], "frechet_floor": r["fd_real_vs_real"],
                "videos": r["videos"],
                **({k: r["first_frame"][k] for k in ("frame0_psnr", "appearance_kept")} if "first_frame" in r else {})}

    return evaluate


def write_student(path: Path, student, pipe, pipeline_config: PipelineConfig, provenance: dict,
                  storage_dtype: str | None = None) -> Path:
    """A student bundle: the DiT, the parts its pipeline names (copied from the teacher's bundle),
    the few-step pipeline;
    weights stored in `storage_dtype` (e.g. "fp16") when given."""
    path = Path(path)
    with bundle_directory(path) as tmp:
        write_bundle_files(tmp, student, pipeline_config, provenance, storage_dtype=storage_dtype_of(storage_dtype))
        copy_parts(pipeline_config, pipe.path, tmp)  # the teacher's text encoder(s), tokenizer(s), codec, image encoder
    return path
