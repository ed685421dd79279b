"""The models shipped in flgengine/assets: loadable by name, small, and their provenance
holds the recipe, the measured training time and the measured quality."""

import json

import numpy as np
import pytest

import flgengine
from flgengine.pipeline import ASSETS, resolve_model, shipped_models
from flgengine.worlds import shapes


def test_assets_stay_under_20_mib():
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total < 20 * 2**20, f"flgengine/assets holds {total / 2**20:.1f} MiB"


def test_shapes_teacher_provenance_has_recipe_time_and_quality():
    assert "shapes-teacher" in shipped_models()
    prov = json.loads((ASSETS / "shapes-teacher" / "provenance.json").read_text())
    train = next(s for s in prov["stages"] if s["stage"] == "train-teacher")
    assert train["recipe"]["steps"] == train["steps"] and 0 < train["train_seconds"] <= 95 * 60
    ev = prov["evaluation"]
    a = ev["prompt_adherence"]
    assert ev["videos"] >= 180 and ev["steps"] == 50 and set(a) >= {"adherence", "colour", "shape", "direction"}
    assert 0 <= a["adherence"] <= min(a["colour"], a["shape"], a["direction"]) <= 1
    assert ev["fd"] > 0 and ev["fd_real_vs_real"] > 0 and ev["motion"]["true_speed"] > 0


def test_default_model_is_the_shipped_teacher_and_draws_the_prompted_colour():
    """Until a student ships the default is the teacher; the evaluator reads the colour it
    was asked for in fresh prompts (the attribute the shipped teacher has learned)."""
    from distill.evaluate import classify, load_evaluator

    assert resolve_model(None).name == ("shapes-4step" if "shapes-4step" in shipped_models() else "shapes-teacher")
    pipe = flgengine.load("shapes-teacher")
    rng = np.random.default_rng(2026)
    prompts = [shapes.prompt_of(c, s, d) for c, s, d in zip(rng.permutation(list(shapes.COLOURS))[:5],
                                                                 rng.choice(shapes.SHAPES, 5), rng.choice(list(shapes.DIRECTIONS), 5))]
    videos = pipe(prompts, seed=7, steps=25, progress=False)
    read = classify(load_evaluator(), videos)
    hits = sum(r == p.split()[1] for r, p in zip(read["colour"], prompts))
    assert hits >= 4, (prompts, read["colour"])
