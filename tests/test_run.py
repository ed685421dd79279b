"""`python -m distill run`: the whole FastLightGen pipeline on a tiny shapes-world teacher."""

import json

import pytest
import torch

import flgengine
from distill.run import RunConfig, run
from flgengine.config import ConfigError


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from distill.teacher import TeacherConfig, train_teacher

    out = tmp_path_factory.mktemp("teacher")
    cfg = TeacherConfig(steps=2, batch_size=2, num_layers=4, ffn_dim=64, num_heads=2, head_dim=16, text_dim=16,
                        freq_dim=16, warmup=1, checkpoint_every=2)
    return train_teacher(cfg, out, progress=False)["bundle"]


def _config(teacher, out, **changes):
    base = dict(teacher=teacher, out=str(out), importance={"samples": 2, "num_t": 2, "batch_size": 4},
                plan={"budget": 0.3}, stage2={"steps": 2, "batch_size": 2, "eval_every": 1, "eval_batch": 2},
                stage3={"steps": 2, "batch_size": 2, "fake_updates": 1, "eval_every": 1, "checkpoint_every": 1},
                evaluate={"samples": 2, "seeds": [0], "batch_size": 2})
    base.update(changes)
    return base


def test_run_end_to_end_makes_a_4_step_student(tiny_teacher, tmp_path):
    result = run(RunConfig(**_config(tiny_teacher, tmp_path / "run")), progress=False)
    out = tmp_path / "run"
    for f in ("config.json", "importance.json", "importance.png", "plan.json", "stage2/bundle/model.safetensors",
              "stage3/evals/step-000000.safetensors", "bundle/model.safetensors", "bundle/text_encoder/model.safetensors"):
        assert (out / f).is_file(), f
    plan = json.loads((out / "plan.json").read_text())
    assert plan["drop"] and 0 not in plan["drop"] and 3 not in plan["drop"] and plan["removed_fraction"] >= 0.3
    pipe = flgengine.load(result["bundle"])
    assert pipe.config.distilled and pipe.config.sampler.kind == "fewstep" and pipe.config.sampler.num_steps == 4
    assert pipe.dit.config.block_ids == plan["keep"]
    video = pipe("a red circle moving left", seed=1, progress=False)
    assert video.shape == (1, 9, 32, 32, 3) and video.dtype == torch.uint8
    stages = [s["stage"] for s in result["provenance"]["stages"]]
    assert stages == ["plan", "stage2", "stage3"]
    selected = result["provenance"]["stages"][-1]["selected"]
    assert selected["step"] in (0, 1, 2) and 0 <= selected["metrics"]["adherence"] <= 1
    # fp16 storage (the shipped student's): the same weights to fp16 rounding, half the file
    half = tmp_path / "half"
    run(RunConfig(**_config(tiny_teacher, tmp_path / "run"), storage_dtype="fp16", bundle=str(half)), progress=False)
    assert (half / "model.safetensors").stat().st_size < 0.6 * (out / "bundle" / "model.safetensors").stat().st_size
    h = flgengine.load(half).dit.state_dict()
    assert all(torch.allclose(h[k], v, rtol=1e-3, atol=1e-4) for k, v in pipe.dit.state_dict().items())
    # a second run finds every stage done and gives the same student
    again = run(RunConfig(**_config(tiny_teacher, tmp_path / "run")), progress=False)
    a = flgengine.load(again["bundle"]).dit.state_dict()
    assert all(torch.equal(v, a[k]) for k, v in pipe.dit.state_dict().items())


def test_torchrun_with_fsdp2_gives_the_single_process_student(tiny_teacher, tmp_path):
    """`torchrun --nproc_per_node 2 -m distill run` (gloo, Stages II and III sharded with
    FSDP2): the same plan and student as one process, files written once by rank 0."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    cfg = _config(tiny_teacher, tmp_path / "ddp")
    cfg["stage2"] = {**cfg["stage2"], "fsdp": True, "threads": 1}
    cfg["stage3"] = {**cfg["stage3"], "fsdp": True, "threads": 1}
    path = tmp_path / "ddp.json"
    path.write_text(json.dumps(cfg))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "distill", "run", str(path), "--quiet"], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("student bundle:") == 1  # rank 0 speaks
    single = run(RunConfig(**_config(tiny_teacher, tmp_path / "one", stage2={**cfg["stage2"], "fsdp": False},
                                     stage3={**cfg["stage3"], "fsdp": False})), progress=False)
    assert json.loads((tmp_path / "ddp" / "plan.json").read_text())["drop"] == \
        json.loads((tmp_path / "one" / "plan.json").read_text())["drop"]
    a, b = flgengine.load(tmp_path / "ddp" / "bundle").dit.state_dict(), flgengine.load(single["bundle"]).dit.state_dict()
    assert a.keys() == b.keys()
    for k, v in b.items():
        torch.testing.assert_close(a[k], v, rtol=1e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")


def test_baseline_switches_and_single_stage_commands(tiny_teacher, tmp_path, capsys):
    from distill.__main__ import main

    cfg = _config(tiny_teacher, tmp_path / "dmd2", stage2=None, stage3={"steps": 1, "batch_size": 2, "fake_updates": 1,
                                                                        "real_score": "cfg", "prune": False},
                  evaluate=None)
    path = tmp_path / "dmd2.json"
    path.write_text(json.dumps(cfg))
    assert main(["stage3", str(path), "--quiet"]) != 0  # needs the plan first: a one-line error
    assert "plan.json: missing" in capsys.readouterr().err
    assert main(["importance", str(path), "--quiet"]) == 0 and main(["plan", str(path), "--quiet"]) == 0
    assert main(["stage3", str(path), "--quiet"]) == 0
    student = flgengine.load(tmp_path / "dmd2" / "bundle")
    assert len(student.dit.blocks) == 4  # full size
    assert json.loads((tmp_path / "dmd2" / "bundle" / "provenance.json").read_text())["kind"] == "DMD2 student"


def test_run_config_is_strict(tiny_teacher, tmp_path):
    def load(data, suffix=".json"):
        path = tmp_path / f"c{suffix}"
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        return RunConfig.load(path)

    good = _config(tiny_teacher, tmp_path / "x")
    assert load(good).stage3_config().steps == 2
    with pytest.raises(ConfigError, match="storage_dtype"):
        load({**good, "storage_dtype": "fp4"})
    assert load({**good, "storage_dtype": "fp8"}).storage_dtype == "fp8"  # e4m3 block linears
    with pytest.raises(ConfigError, match="unknown key 'stage4'"):
        load({**good, "stage4": {}})
    with pytest.raises(ConfigError, match="unknown key 'alpah' for Stage2Config"):
        load({**good, "stage2": {"alpah": 1}})
    with pytest.raises(ConfigError, match="stage3.b1_range"):
        load({**good, "stage3": {"b1_range": [4, 3]}})
    with pytest.raises(ConfigError, match="importance: unknown key 'sample'"):
        load({**good, "importance": {"sample": 3}})
    with pytest.raises(ConfigError, match="data.kind"):
        load({**good, "data": {"kind": "web"}})
    with pytest.raises(ConfigError, match="missing 1 required positional argument: 'out'"):
        load({"teacher": "x"})
    yaml_cfg = load(f"teacher: {tiny_teacher}\nout: {tmp_path / 'y'}\nstage3:\n  steps: 7\n", ".yaml")
    assert yaml_cfg.stage3_config().steps == 7 and yaml_cfg.stage2_config().alpha == 1.0
    with pytest.raises(ConfigError, match="not valid YAML"):
        load("teacher: [", ".yaml")


def test_run_config_overrides_from_the_command_line(tiny_teacher, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(_config(tiny_teacher, tmp_path / "x")))
    cfg = RunConfig.load(path, ["stage3.steps=9", "out=runs/other", "stage3.b1_range=[2.0, 3.5]", "stage2=null",
                                "evaluate.seeds=[1, 2]", "plan.budget=0.25"])
    assert cfg.stage3_config().steps == 9 and cfg.out == "runs/other" and cfg.stage2 is None
    assert list(cfg.stage3_config().b1_range) == [2.0, 3.5] and cfg.evaluate["seeds"] == [1, 2] and cfg.plan["budget"] == 0.25
    assert RunConfig.load(path, ["stage2.alpha=0.5"]).stage2_config().alpha == 0.5  # untouched keys stay
    assert RunConfig.load(path, ["stage2.alpha=0.5"]).stage2_config().steps == 2
    # overrides are validated like the file: unknown keys and bad values name the key
    with pytest.raises(ConfigError, match="unknown key 'alpah' for Stage2Config"):
        RunConfig.load(path, ["stage2.alpah=1"])
    with pytest.raises(ConfigError, match="stage3.b1_range"):
        RunConfig.load(path, ["stage3.b1_range=[4, 3]"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        RunConfig.load(path, ["stage3.steps"])
    with pytest.raises(ConfigError, match="out is 'runs/x2', not a section"):
        RunConfig.load(path, ["out=runs/x2", "out.deeper=1"])


def test_compare_table(tiny_teacher, tmp_path):
    from distill.compare import compare, markdown

    student = run(RunConfig(**_config(tiny_teacher, tmp_path / "run", evaluate=None)), progress=False)["bundle"]
    rows = compare(tiny_teacher, [("FastLightGen", student)], samples=2, progress=False, grid=tmp_path / "grid.gif")
    assert [r["nfe"] for r in rows] == [100, 8, 4]
    import imageio.v3 as iio

    from distill.compare import GRID_PROMPTS

    grid = iio.imread(tmp_path / "grid.gif")  # (T, H, W, C): 3 model rows x 5 prompt columns of 3x cells
    assert grid.shape[0] == 9 and grid.shape[1] > 3 * 96 and grid.shape[2] > len(GRID_PROMPTS) * 96
    assert rows[2]["params"] < rows[0]["params"] and rows[0]["speedup"] == 1.0
    assert all(0 <= r["adherence"]["adherence"] <= 1 and r["seconds_per_video"] > 0 for r in rows)
    table = markdown(rows)
    assert table.count("\n") == 4 and "| FastLightGen | 4 |" in table


def test_shipped_run_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) == 9
    kinds = {RunConfig.load(c).out: (RunConfig.load(c).stage2 is None, RunConfig.load(c).stage3_config().real_score,
                                     RunConfig.load(c).stage3_config().prune) for c in configs}
    # the shipped student: Stages I-II, then a plain-CFG real score of the Stage II network; its
    # sparse-aware and FP8-aware continuations: Stage III from it, on the teacher's CFG
    assert kinds == {"runs/shapes-4step": (False, "cfg", True), "runs/shapes-prune-dmd2": (True, "cfg", True),
                     "runs/shapes-dmd2": (True, "cfg", False), "runs/shapes-4step-sparse": (True, "cfg", False),
                     "runs/shapes-4step-fp8": (True, "cfg", False),
                     "runs/shapes-i2v-4step": (False, "cfg", True),  # the image-to-video student: the same recipe
                     "runs/shapes-i2v-prune-dmd2": (True, "cfg", True), "runs/shapes-i2v-dmd2": (True, "cfg", False),
                     "runs/shapes-i2v-4step-data": (True, "cfg", False)}
    sparse = RunConfig.load(configs[0].parent / "shapes-4step-sparse.yaml").stage3_config()
    assert sparse.init_student == "shapes-4step" and sparse.attention["kind"] == "per_head" and sparse.adapt_steps > 0
    fp8 = RunConfig.load(configs[0].parent / "shapes-4step-fp8.yaml").stage3_config()
    assert fp8.init_student == "shapes-4step" and fp8.precision == "fp8"
    data = RunConfig.load(configs[0].parent / "shapes-i2v-4step-data.yaml").stage3_config()  # the data term alone
    assert data.init_student == "shapes-i2v-4step" and data.dmd == 0 and data.data_denoise > 0
    assert data.denoise_steps() == [0, 1, 2, 3]


def test_sparse_aware_continuation_of_a_student(tiny_teacher, tmp_path):
    # a student made by the full run, then continued with a block-sparse pattern on (stage3.attention)
    student = run(RunConfig(**_config(tiny_teacher, tmp_path / "run", evaluate=None)), progress=False)["bundle"]
    attention = {"kind": "tile_window", "tile": [1, 4, 4], "window": [3, 1, 1], "block": 16, "head_windows": None}
    cfg = _config(tiny_teacher, tmp_path / "sparse", stage2=None, evaluate=None,
                  stage3={"steps": 2, "batch_size": 2, "fake_updates": 1, "eval_every": 1, "checkpoint_every": 1,
                          "init_student": student, "real_score": "cfg", "prune": False, "attention": attention,
                          "adapt_steps": 2})
    result = run(RunConfig(**cfg), progress=False)
    out = tmp_path / "sparse"
    assert not (out / "importance.json").exists() and not (out / "plan.json").exists()  # no plan needed
    start, cont = flgengine.load(student), flgengine.load(result["bundle"])
    assert cont.dit.config.block_ids == start.dit.config.block_ids
    assert cont.dit.config.attention.to_dict() == attention and cont.dit.sparse is not None
    changed = [k for k, v in start.dit.state_dict().items() if not torch.equal(v, cont.dit.state_dict()[k])]
    assert changed  # it trained
    assert [s["stage"] for s in result["provenance"]["stages"]][-1] == "stage3"
    assert result["provenance"]["stages"][-1]["adapt"]["steps"] == 2  # pattern adaptation first
    assert result["provenance"]["init_student"]["path"] == student
    # `distill compare --training-free`: the start run with the same pattern, untrained, beside it
    from distill.compare import _runs

    runs = _runs(tiny_teacher, [("sparse", result["bundle"])], 4, training_free=True)
    assert [r[0] for r in runs[2:]] == ["sparse", "sparse: its start, the pattern without training"]
    free = runs[3][1].dit
    assert free.config.attention.to_dict() == attention
    assert all(torch.equal(v, free.state_dict()[k]) for k, v in start.dit.state_dict().items())
    video = cont("a red circle moving left", seed=1, progress=False)
    assert video.shape == (1, 9, 32, 32, 3)
    with pytest.raises(ConfigError, match="init_student"):
        RunConfig(**{**cfg, "stage3": {**cfg["stage3"], "real_score": "well-guided"}})


def test_prompt_sensitivity_probe(tiny_teacher, capsys):
    from distill.__main__ import main
    from distill.probe import prompt_sensitivity

    rows = prompt_sensitivity(flgengine.load(tiny_teacher), n=4, ts=(0.9, 0.5))
    assert [r["t"] for r in rows] == [0.9, 0.5]
    assert all(set(r) == {"t", "true", "uncond", "colour", "shape", "direction"} for r in rows)
    assert rows[0]["true"] != rows[0]["colour"]  # a swapped colour word changes the text states, so the loss
    assert main(["probe", tiny_teacher, "--samples", "2", "--ideal-clips", "2"]) == 0
    out = capsys.readouterr().out
    assert "+direction" in out and "what the data allows" in out


def test_probe_ideal_gaps_rank_the_words_as_the_world_does():
    # what a perfect model's loss gap would be at t -> 1 with one word swapped: colour moves the
    # most pixels, direction moves the mean blob by frame x column (~8.5 px of travel), shape
    # changes only the blob's edge (measured with 96 clips per prompt: 0.020 / 0.0117 / 0.0055)
    from distill.probe import ideal_gaps
    from flgengine.codec import PixelCodec

    gaps = ideal_gaps(PixelCodec(), per_prompt=16, seed=1)
    assert gaps["colour"] > gaps["direction"] > gaps["shape"] > 0.002
    assert 0.015 < gaps["colour"] < 0.025 and 0.008 < gaps["direction"] < 0.016


@pytest.mark.parametrize("image", ["concat", "first_frame"])
def test_run_distills_an_image_to_video_teacher(tiny_teacher, tmp_path, image):
    """The whole run on an image-conditioned teacher: every stage gives its DiTs the batch's first
    frames (concat: mask + frame 0 channels; first_frame: frame 0 in place at t = 0); the 4-step
    student is an image-to-video bundle."""
    from distill.data import world_data
    from distill.teacher import TeacherConfig, train_teacher

    i2v = train_teacher(TeacherConfig(steps=2, batch_size=2, init_from=tiny_teacher, image=image, warmup=1,
                                      checkpoint_every=2), tmp_path / "i2v-teacher", progress=False)["bundle"]
    teacher = flgengine.load(i2v)
    data = world_data(teacher)
    x0, _ = data.batch(0, 2)
    cond = data.condition(x0, 0)
    assert cond.kind == image
    if image == "concat":
        assert cond.latents.shape == (2, 4, 9, 32, 32) and torch.equal(cond.latents[:, 1:, 0], x0[:, :, 0])
        assert not cond.latents[:, :, 1:].any()
    else:
        assert torch.equal(cond.latents, x0[:, :, :1]) and torch.equal(cond.finish(torch.zeros_like(x0))[:, :, 0], x0[:, :, 0])
    result = run(RunConfig(**_config(i2v, tmp_path / "run", plan={"budget": 0.25})), progress=False)
    pipe = flgengine.load(result["bundle"])
    assert pipe.config.image == image and pipe.config.distilled
    assert pipe.dit.config.in_channels == (7 if image == "concat" else 3)
    first = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    video = pipe("a red circle moving left", image=first, seed=1, progress=False)
    assert video.shape == (1, 9, 32, 32, 3)
    if image == "first_frame":
        assert torch.equal(video[0, 0], first)  # the pixel codec keeps the given frame exactly
    with pytest.raises(ValueError, match="is image-to-video"):
        pipe("a red circle moving left", progress=False)
    evals = result["provenance"]["stages"][-1]["evaluations"]
    assert evals and all("frame0_psnr" in e["metrics"] for e in evals)
    # the comparison table and grid of image-to-video models give them world first frames
    from distill.compare import compare, markdown

    rows = compare(i2v, [("FastLightGen", result["bundle"])], samples=2, seeds=(0,), batch_size=2, teacher_few_steps=2,
                   progress=False, grid=str(tmp_path / "grid.gif"))
    assert all(0 <= r["first_frame"]["appearance_kept"] <= 1 for r in rows) and (tmp_path / "grid.gif").is_file()
    assert "| frame 0 PSNR | appearance kept |" in markdown(rows)


def test_the_stages_put_a_batch_s_condition_in_also_under_cfg():
    from distill.data import conditioned
    from distill.stage3 import real_velocity
    from flgengine.conditioning import ImageCondition

    seen = []

    class Net(torch.nn.Module):
        def forward(self, x, t, context):
            seen.append((x, t))
            return x[:, :3] * 0.5

    x, y = torch.randn(2, 3, 2, 4, 4), torch.randn(2, 4, 2, 4, 4)
    net, T, ctx = Net(), torch.tensor([500.0, 250.0]), torch.zeros(2, 3, 8)
    assert conditioned(net, None) is net
    concat = ImageCondition("concat", y, None, (1, 2, 2))
    conditioned(net, concat)(x, T, ctx)
    assert torch.equal(seen[-1][0], torch.cat([x, y], 1))
    v = real_velocity(net, [], x, T, ctx, torch.zeros(1, 3, 8), 2.0, 0.0, "cfg", concat)  # cond and uncond in one batch
    assert torch.equal(seen[-1][0], torch.cat([torch.cat([x, y], 1)] * 2)) and v.shape == x.shape
    mask = torch.ones(1, 1, 2, 4, 4)
    mask[:, :, 0] = 0
    first = ImageCondition("first_frame", y[:, :3, :1], mask, (1, 2, 2))
    conditioned(net, first)(x, T, ctx)
    x_in, t_in = seen[-1]
    assert torch.equal(x_in[:, :, 0], y[:, :3, 0]) and torch.equal(x_in[:, :, 1], x[:, :, 1])
    assert t_in.shape == (2, 8) and (t_in[:, :4] == 0).all() and torch.equal(t_in[:, 4:], T[:, None].expand(2, 4))
    assert torch.equal(first.map(lambda z: z[1:]).latents, y[1:, :3, :1])
