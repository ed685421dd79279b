"""The shipped shapes-world models: loadable by name, the default, and good at their job."""

import json

import pytest
import torch

import flgengine
from flgengine.pipeline import ASSETS, resolve_model, shipped_models
from flgengine.worlds import shapes


def test_shapes_teacher_is_shipped_loadable_by_name_and_the_default():
    assert "shapes-teacher" in shipped_models()
    pipe = flgengine.load("shapes-teacher")
    assert pipe.dit.config.num_layers >= 8 and len(pipe.dit.config.kept_blocks) == pipe.dit.config.num_layers
    assert pipe.config.sampler.kind == "euler" and pipe.config.sampler.num_steps == 50 and pipe.config.sampler.guidance > 1
    assert (pipe.config.num_frames, pipe.config.height, pipe.config.width) == (shapes.NUM_FRAMES, shapes.SIZE, shapes.SIZE)
    assert resolve_model(None).name in ("shapes-4step", "shapes-teacher")


def test_shapes_teacher_provenance_records_recipe_time_and_evaluation():
    prov = json.loads((ASSETS / "shapes-teacher" / "provenance.json").read_text())
    stage = prov["stages"][0]
    assert stage["stage"] == "train-teacher" and stage["train_seconds"] <= 95 * 60 and "recipe" in stage
    ev = prov["evaluation"]
    assert ev["steps"] == 50 and ev["videos"] >= 180
    assert ev["prompt_adherence"]["adherence"] >= 0.90
    assert abs(ev["motion"]["ratio"] - 1) <= 0.15


def test_shapes_teacher_follows_prompts_on_this_cpu():
    from distill.evaluate import load_evaluator, prompt_adherence

    prompts = list(shapes.PROMPTS[::8])  # 8 prompts spread over colours, shapes and directions
    video = flgengine.generate(prompts, seed=1, progress=False)
    assert video.shape == (8, shapes.NUM_FRAMES, shapes.SIZE, shapes.SIZE, 3) and video.dtype == torch.uint8
    score = prompt_adherence(load_evaluator(), video, prompts)
    assert score["adherence"] >= 6 / 8, score
