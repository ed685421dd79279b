"""The models shipped in flgengine/assets: loadable by name, small, and their provenance
holds the recipe, the measured training time and the measured quality."""

import dataclasses
import json

import numpy as np
import torch

import flgengine
from flgengine.model import main_expert
from flgengine.pipeline import ASSETS, resolve_model, shipped_models
from distill.worlds import shapes


def weights_lineage(prov: dict) -> set[str]:
    """The hashes a bundle's weights had: now, and before each `store` (a copy stored another way)."""
    return {prov["weights_sha256"], *(s["from_weights_sha256"] for s in prov.get("stages", []) if s["stage"] == "store")}


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
    # two experts: the low-noise one's run recorded, the evaluation taken with the shipped split and guidance
    low = next(s for s in prov["stages"] if s["stage"] == "train-low-noise-expert")
    assert low["recipe"]["expert_of"] and 0 < low["train_seconds"] <= 30 * 60 and low["boundary"] == ev["low_noise_boundary"]
    sampler = json.loads((ASSETS / "shapes-teacher" / "pipeline.json").read_text())["sampler"]
    assert ev["guidance"] == sampler["guidance"] and ev["low_noise_guidance"] == sampler["low_noise_guidance"]


def test_shipped_teacher_draws_what_it_is_asked_for():
    """The evaluator reads the colour, shape and direction the teacher was asked for in
    fresh prompts (measured on 180 videos: 1.000 / 0.872 / 0.989)."""
    from distill.evaluator import classify, load_evaluator

    pipe = flgengine.load("shapes-teacher")
    rng = np.random.default_rng(2026)
    n = 8
    facts = [(list(shapes.COLOURS)[rng.integers(5)], shapes.SHAPES[rng.integers(3)],
              list(shapes.DIRECTIONS)[rng.integers(4)]) for _ in range(n)]
    prompts = [shapes.prompt_of(*f) for f in facts]
    read = classify(load_evaluator(), pipe(prompts, seed=7, steps=25, progress=False))
    for i, attr in enumerate(("colour", "shape", "direction")):
        hits = sum(r == f[i] for r, f in zip(read[attr], facts))
        assert hits >= (n if attr == "colour" else n - 2), (attr, prompts, read[attr])


def test_shapes_student_is_the_4_step_pruned_distillation_of_the_teacher():
    """shapes-4step: 4 steps, no CFG, ~30% fewer DiT parameters than shapes-teacher, made
    by `distill run` (plan, Stage II, Stage III from the shipped teacher's weights), with
    its evaluation at 4 steps in provenance."""
    assert "shapes-4step" in shipped_models()
    student, teacher = flgengine.load("shapes-4step"), flgengine.load("shapes-teacher")
    sampler = student.config.sampler
    assert student.config.distilled and sampler.kind == "fewstep" and sampler.num_steps == 4 and not sampler.guidance
    removed = 1 - student.dit.num_params() / main_expert(teacher.dit).num_params()  # of the DiT it was pruned from
    assert 0.25 <= removed <= 0.40, removed
    prov = json.loads((ASSETS / "shapes-4step" / "provenance.json").read_text())
    stages = [s["stage"] for s in prov["stages"] if s["stage"] != "store"]  # `store`: the weights stored smaller after
    assert prov["kind"] == "FastLightGen student" and stages == ["plan", "stage2", "stage3"]
    plan = prov["stages"][0]
    assert student.dit.config.block_ids == plan["keep"] and 0 not in plan["drop"] and 7 not in plan["drop"]
    teacher_prov = json.loads((ASSETS / "shapes-teacher" / "provenance.json").read_text())
    assert prov["teacher"]["weights_sha256"] in weights_lineage(teacher_prov)
    ev = prov["evaluation"]
    assert ev["videos"] >= 180 and ev["steps"] == 4 and 0 <= ev["prompt_adherence"]["adherence"] <= 1
    assert ev["fd"] > 0 and ev["motion"]["ratio"] > 0


def test_sparse_student_is_the_shipped_student_trained_for_its_block_sparse_pattern():
    """shapes-4step-sparse: shapes-4step continued by Stage III with its self-attention pattern on
    (pattern adaptation, then DMD), the pattern in config.json, evaluated with it; it runs the
    pattern (its videos differ from the same weights run dense) and draws the prompted colour."""
    from distill.evaluator import classify, load_evaluator

    assert "shapes-4step-sparse" in shipped_models()
    sparse, dense = flgengine.load("shapes-4step-sparse"), flgengine.load("shapes-4step")
    attention = sparse.dit.config.attention
    assert attention is not None and attention.kind == "per_head" and dense.dit.config.attention is None
    assert sparse.dit.config.block_ids == dense.dit.config.block_ids and sparse.config.sampler.num_steps == 4
    prov = json.loads((ASSETS / "shapes-4step-sparse" / "provenance.json").read_text())
    dense_prov = json.loads((ASSETS / "shapes-4step" / "provenance.json").read_text())
    assert prov["init_student"]["weights_sha256"] in weights_lineage(dense_prov)
    stage3 = [s for s in prov["stages"] if s["stage"] == "stage3"][-1]
    assert stage3["recipe"]["adapt_steps"] > 0
    assert stage3["recipe"]["attention"] == json.loads(json.dumps(dataclasses.asdict(attention)))
    ev = prov["evaluation"]
    assert ev["videos"] >= 180 and ev["steps"] == 4 and 0 <= ev["prompt_adherence"]["adherence"] <= 1 and ev["fd"] > 0
    prompts = [shapes.prompt_of(c, "square", d) for c, d in zip(shapes.COLOURS, ("up", "down", "left", "right", "up"))]
    videos = sparse(prompts, seed=5, progress=False)
    dense_weights = flgengine.load("shapes-4step-sparse")
    dense_weights.dit.set_attention(None)
    assert not torch.equal(videos, dense_weights(prompts, seed=5, progress=False))  # the pattern is on
    read = classify(load_evaluator(), videos)
    assert sum(r == p.split()[1] for r, p in zip(read["colour"], prompts)) >= 4, (prompts, read["colour"])


def test_shipped_students_state_their_quality_in_each_precision():
    """Every shipped student holds its evaluation as stored (bf16 numerics: fp32 on the CPU) and
    in FP8 (`distill evaluate --precision fp8 --write-provenance`), on the same videos."""
    for name in ("shapes-4step", "shapes-4step-sparse", "shapes-i2v-4step"):
        prov = json.loads((ASSETS / name / "provenance.json").read_text())
        ev, fp8 = prov["evaluation"], prov["evaluation_fp8"]
        assert ev["precision"] == "bf16" and fp8["precision"] == "fp8", name
        assert ev["videos"] == fp8["videos"] >= 180 and ev["seeds"] == fp8["seeds"] and ev["steps"] == fp8["steps"] == 4
        assert 0 <= fp8["prompt_adherence"]["adherence"] <= 1 and fp8["fd"] > 0, name


def test_default_model_is_the_student_and_draws_the_prompted_colour_in_4_steps():
    from distill.evaluator import classify, load_evaluator

    assert resolve_model(None).name == "shapes-4step"
    pipe = flgengine.load(resolve_model(None))
    assert pipe.config.sampler.num_steps == 4
    rng = np.random.default_rng(2027)
    prompts = [shapes.prompt_of(c, s, d) for c, s, d in zip(rng.permutation(list(shapes.COLOURS))[:5],
                                                                 rng.choice(shapes.SHAPES, 5), rng.choice(list(shapes.DIRECTIONS), 5))]
    videos = pipe(prompts, seed=7, progress=False)
    read = classify(load_evaluator(), videos)
    hits = sum(r == p.split()[1] for r, p in zip(read["colour"], prompts))
    assert hits >= 4, (prompts, read["colour"])


def test_image_to_video_models_are_the_teacher_and_its_pruned_4_step_student():
    """shapes-i2v-teacher (first_frame, two experts, fine-tuned from shapes-teacher) and
    shapes-i2v-4step (its FastLightGen student, continued on the data alone), each with its
    evaluation in provenance."""
    assert {"shapes-i2v-teacher", "shapes-i2v-4step"} <= set(shipped_models())
    teacher, student = flgengine.load("shapes-i2v-teacher"), flgengine.load("shapes-i2v-4step")
    assert teacher.config.image == student.config.image == "first_frame"
    assert teacher.config.low_noise_boundary is not None and not teacher.config.distilled
    assert student.config.distilled and student.config.sampler.num_steps == 4
    removed = 1 - student.dit.num_params() / main_expert(teacher.dit).num_params()
    assert 0.25 <= removed <= 0.40, removed
    t_prov = json.loads((ASSETS / "shapes-i2v-teacher" / "provenance.json").read_text())
    s_prov = json.loads((ASSETS / "shapes-i2v-4step" / "provenance.json").read_text())
    assert t_prov["storage_dtype"] == s_prov["storage_dtype"] == "int4"
    assert s_prov["teacher"]["weights_sha256"] in weights_lineage(t_prov)
    stage3, data_alone = (s["recipe"] for s in s_prov["stages"] if s["stage"] == "stage3")
    assert stage3["data_denoise"] > 0 and stage3["data_denoise_steps"] == [3]  # configs/shapes-i2v-4step.yaml
    # then continued on the data alone (configs/shapes-i2v-4step-data.yaml), stored int4 in groups of 32
    assert data_alone["dmd"] == 0 and data_alone["data_denoise_steps"] == [0, 1, 2, 3]
    assert s_prov["init_student"]["path"] == "shapes-i2v-4step" and s_prov["stages"][-1]["int4_group"] == 32
    init = next(s for s in t_prov["stages"] if s["stage"] == "train-teacher")["recipe"]
    assert init["image"] == "first_frame" and init["init_from"].endswith("shapes-teacher")
    for prov, steps in ((t_prov, 50), (s_prov, 4)):
        ev = prov["evaluation"]
        assert ev["videos"] >= 180 and ev["steps"] == steps and ev["first_frame"]["frame0_psnr"] >= 30


def test_image_to_video_student_keeps_the_given_frame_and_colour():
    from distill.evaluator import classify, load_evaluator

    pipe = flgengine.load("shapes-i2v-4step")
    rng = np.random.default_rng(2028)
    clips = [shapes.sample_clip(rng) for _ in range(5)]
    firsts = [shapes.render(c)[0] for c in clips]
    videos = pipe([c.prompt for c in clips], image=firsts, seed=3, progress=False)
    for v, f in zip(videos, firsts):
        assert torch.equal(v[0], torch.from_numpy(f))  # frame 0 is the given image
    read = classify(load_evaluator(), videos)
    assert sum(r == c.colour for r, c in zip(read["colour"], clips)) >= 4, (read, clips)
