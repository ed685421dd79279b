"""The shared training loop: data parallel = one process, kill + resume = uninterrupted, NaN stops."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from distill.checkpoint import CHECKPOINT, load_checkpoint
from distill.trainer import NonFiniteLoss, Trainer

ROOT = Path(__file__).resolve().parents[1]

# A tiny Stage II run, importable by spawned processes (tests/ is on their sys.path).
STAGE2 = textwrap.dedent("""
    import torch
    from distill.plan import plan_from_drop
    from distill.stage2 import Stage2Config, train_stage2
    from flgengine.config import ModelConfig
    from flgengine.model import DiT

    class FakeData:
        uncond = torch.zeros(1, 3, 12)

        def batch(self, step, n):
            g = torch.Generator().manual_seed(1000 + step)
            return torch.randn(n, 4, 2, 4, 4, generator=g), torch.randn(n, 3, 12, generator=g)

    class PackedData(FakeData):  # HunyuanVideo's packed text: the empty prompt has a real token too
        uncond = torch.full((1, 3, 12), 0.1)

    def tiny_teacher(family="wan"):
        torch.manual_seed(0)
        if family == "hunyuan_video":  # 2 dual- + 2 single-stream blocks; the context is packed text
            from flgengine.model.hunyuan import HunyuanVideoConfig, HunyuanVideoDiT

            return HunyuanVideoDiT(HunyuanVideoConfig(in_channels=4, out_channels=4, num_heads=2, head_dim=8,
                                                      num_layers=2, num_single_layers=2, num_refiner_layers=1,
                                                      mlp_ratio=1.5, text_dim=12, pooled_dim=5, rope_axes=(2, 2, 4),
                                                      guidance_embed=False))
        return DiT(ModelConfig(in_channels=4, out_channels=4, patch_size=(1, 2, 2), num_heads=2, head_dim=8,
                               ffn_dim=24, text_dim=12, freq_dim=16, num_layers=4))

    def tiny_stage2(out, steps=6, checkpoint_every=2, fsdp=False, family="wan"):
        teacher = tiny_teacher(family)
        plan = plan_from_drop(teacher, [1, 2], {b: 0.0 for b in range(4)})
        cfg = Stage2Config(steps=steps, batch_size=8, lr=1e-3, warmup=0, eval_every=100, eval_batch=4,
                           checkpoint_every=checkpoint_every, threads=1, fsdp=fsdp)
        data = PackedData() if family == "hunyuan_video" else FakeData()
        model, _ = train_stage2(teacher, plan, data, cfg, out, progress=False)
        return model.state_dict()

    def tiny_stage3(out, fsdp=False):
        from distill.stage3 import Stage3Config, train_stage3

        torch.manual_seed(0)
        teacher = DiT(ModelConfig(in_channels=4, out_channels=4, patch_size=(1, 2, 2), num_heads=2, head_dim=8,
                                  ffn_dim=24, text_dim=12, freq_dim=16, num_layers=4))
        plan = plan_from_drop(teacher, [1, 2], {b: 0.0 for b in range(4)})
        scores = iter([0.2, 0.9, 0.5, 0.4])

        def evaluate(student):  # a made-up score that peaks at the second evaluation (step 2)
            return {"adherence": next(scores), "frechet": float(sum(p.detach().sum() for p in student.parameters())),
                    "motion_ratio": 1.0}

        cfg = Stage3Config(steps=6, batch_size=4, fake_updates=2, eval_every=2, checkpoint_every=3, lr_student=1e-3,
                           threads=1, fsdp=fsdp)
        student, record = train_stage3(teacher, plan, FakeData(), cfg, out, evaluate=evaluate, progress=False)
        assert record["selected"]["step"] == 2, record["selected"]
        return student.state_dict()
""")


@pytest.fixture(scope="module")
def stage2_module(tmp_path_factory):
    d = tmp_path_factory.mktemp("mod")
    (d / "tiny_stage2_run.py").write_text(STAGE2)
    sys.path.insert(0, str(d))
    import tiny_stage2_run

    yield tiny_stage2_run
    sys.path.remove(str(d))


def _ddp_worker(rank, world, init_file, out, result, fsdp=False, stage="tiny_stage2", family="wan"):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import tiny_stage2_run

        kw = {"family": family} if stage == "tiny_stage2" else {}
        state = getattr(tiny_stage2_run, stage)(out, fsdp=fsdp, **kw)
        if rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, result)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fsdp,family", [(False, "wan"), (True, "wan"), (True, "hunyuan_video")],
                         ids=["ddp", "fsdp2", "fsdp2-hunyuan"])
def test_two_gloo_processes_match_one_process(stage2_module, tmp_path, fsdp, family):
    """FSDP2 shards every entry of `blocks`: both of HunyuanVideo's block kinds."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    single = stage2_module.tiny_stage2(tmp_path / "single", family=family)
    result = tmp_path / "ddp.safetensors"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp"), str(result), fsdp, "tiny_stage2",
                                family), nprocs=2, join=True)
    ddp = load_file(result)
    assert ddp.keys() == single.keys()
    for k, v in single.items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    # the checkpoint holds full tensors, whatever the sharding: it matches one process's too
    ckpt, ckpt1 = (load_checkpoint(tmp_path / d / CHECKPOINT) for d in ("ddp", "single"))
    assert ckpt["step"] == 6
    for k, v in ckpt1["modules"]["dit"].items():
        torch.testing.assert_close(ckpt["modules"]["dit"][k], v, rtol=1e-5, atol=1e-6)
    moments1 = ckpt1["optimizers"]["main"]["state"]
    for i, per_param in ckpt["optimizers"]["main"]["state"].items():
        torch.testing.assert_close(per_param["exp_avg"], moments1[i]["exp_avg"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_stage3_in_two_gloo_processes_matches_one_process(stage2_module, tmp_path, fsdp):
    """Stage III: student, fake score and real score sharded (FSDP2) or replicated (DDP);
    rank 0 evaluates the gathered student and every rank returns the best checkpoint."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    single = stage2_module.tiny_stage3(tmp_path / "single")
    result = tmp_path / "ddp.safetensors"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp"), str(result), fsdp, "tiny_stage3"),
             nprocs=2, join=True)
    ddp = load_file(result)
    assert ddp.keys() == single.keys()
    # Adam (beta1 0) turns rounding-level gradient differences near zero into small steps
    for k, v in single.items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")


def test_killed_run_resumes_to_the_same_weights(stage2_module, tmp_path):
    straight = stage2_module.tiny_stage2(tmp_path / "straight", steps=30, checkpoint_every=1)
    out = tmp_path / "killed"
    code = f"import sys; sys.path.insert(0, {str(Path(stage2_module.__file__).parent)!r}); " \
           f"import tiny_stage2_run; tiny_stage2_run.tiny_stage2({str(out)!r}, steps=30, checkpoint_every=1)"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill once a few checkpoints are down
        if (out / CHECKPOINT).exists() and load_checkpoint(out / CHECKPOINT)["step"] >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(out / CHECKPOINT)["step"]
    assert 3 <= killed_at < 30
    resumed = stage2_module.tiny_stage2(out, steps=30, checkpoint_every=1)
    assert all(torch.equal(resumed[k], v) for k, v in straight.items())


def test_resume_ignores_runtime_keys_at_any_depth(tmp_path):
    model = torch.nn.Linear(3, 1)

    def trainer(**stage):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return Trainer(tmp_path, {"m": model}, {"main": opt}, steps=4, recipe={"stage3": {"lr": 1.0, **stage}},
                       runtime=("threads",), checkpoint_every=1, progress=False)

    for _ in trainer(threads=1):
        pass
    assert trainer(threads=2).step == 4  # how it runs may change
    with pytest.raises(ValueError, match="another recipe"):
        trainer(threads=1, lr=2.0)  # what it computes may not


def test_resume_accepts_a_later_key_at_the_value_its_absence_means(tmp_path):
    model = torch.nn.Linear(3, 1)

    def trainer(**stage):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return Trainer(tmp_path, {"m": model}, {"main": opt}, steps=4, recipe={"stage3": {"lr": 1.0, **stage}},
                       checkpoint_every=1, progress=False, added_later={"denoise": 0.0})

    for _ in trainer():  # a checkpoint of a version before `denoise` existed
        pass
    assert trainer(denoise=0.0).step == 4  # the key at its "off" value computes what that version did
    with pytest.raises(ValueError, match="another recipe"):
        trainer(denoise=1.0)  # turned on: another recipe
    with pytest.raises(ValueError, match="another recipe"):
        trainer(lr=2.0)


def test_stage3_resumes_a_run_from_before_its_later_keys(tmp_path):
    from distill.checkpoint import save_checkpoint
    from distill.plan import plan_from_drop
    from distill.stage3 import Stage3Config, train_stage3
    from flgengine.model import DiT
    from helpers import tiny_config

    class Data:
        uncond = torch.zeros(1, 3, 12)

        def batch(self, step, n):
            g = torch.Generator().manual_seed(step)
            return torch.randn(n, 4, 2, 4, 4, generator=g), torch.randn(n, 3, 12, generator=g)

    torch.manual_seed(0)
    teacher = DiT(tiny_config()).eval()
    plan = plan_from_drop(teacher, [1], {b: 0.0 for b in range(4)})
    cfg = dict(batch_size=2, fake_updates=1, checkpoint_every=1)
    train_stage3(teacher, plan, Data(), Stage3Config(steps=1, **cfg), tmp_path, progress=False)
    # the checkpoint as a version before the later keys wrote it
    state = load_checkpoint(tmp_path / CHECKPOINT)
    state["config"]["stage3"] = {k: v for k, v in state["config"]["stage3"].items()
                                 if k not in Stage3Config._ADDED_LATER}
    save_checkpoint(tmp_path / CHECKPOINT, state)
    _, record = train_stage3(teacher, plan, Data(), Stage3Config(steps=2, **cfg), tmp_path, progress=False)
    assert record["steps"] == 2  # resumed with the keys off
    with pytest.raises(ValueError, match="another recipe"):
        train_stage3(teacher, plan, Data(), Stage3Config(steps=3, data_denoise=1.0, **cfg), tmp_path, progress=False)


def test_metrics_log_every_n_steps_and_every_evaluation(tmp_path):
    import json

    model = torch.nn.Linear(3, 1)
    trainer = Trainer(tmp_path, {"m": model}, {"main": torch.optim.SGD(model.parameters(), lr=0.1)}, steps=25,
                      recipe={}, checkpoint_every=100, progress=False, log_every=10)
    for step in trainer:
        trainer.log(loss=float(step))
        if (step + 1) % 7 == 0:
            trainer.log(eval_loss=-1.0)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [7, 10, 14, 20, 21, 25]
    assert [r["step"] for r in rows if "eval_loss" in r] == [7, 14, 21]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(tmp_path, {"m": model}, {"main": opt}, steps=10, recipe={"r": 1}, checkpoint_every=2,
                      progress=False)
    x = torch.ones(4, 3)
    with pytest.raises(NonFiniteLoss, match=f"step 5: loss is nan.*{CHECKPOINT}"):
        for step in trainer:
            loss = model(x).pow(2).mean() * (float("nan") if step == 5 else 1.0)
            trainer.update("main", loss)
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == 4
    # resuming with another recipe is refused
    with pytest.raises(ValueError, match="another recipe"):
        Trainer(tmp_path, {"m": model}, {"main": opt}, steps=10, recipe={"r": 2}, progress=False)
