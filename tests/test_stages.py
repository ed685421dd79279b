"""Stage II (probabilistic pruning) and Stage III (well-guided DMD) on tiny models."""

import copy
from dataclasses import replace as dataclasses_replace
import json

import pytest
import torch

from distill.importance import skip_blocks
from distill.plan import plan_from_drop
from distill.stage2 import Stage2Config, draw_skips, noisy_batch, stage2_loss, train_stage2
from distill.stage3 import (Stage3Config, data_denoise_loss, dmd_loss, real_velocity, select, student_x0,
                            train_stage3)
from flgengine.config import ConfigError
from flgengine.model import DiT
from helpers import assert_close, tiny_config


class FakeData:
    """Random latents (B, 4, 2, 4, 4) and text states (B, 3, 12), random access by step."""

    uncond = torch.zeros(1, 3, 12)

    def batch(self, step, n):
        g = torch.Generator().manual_seed(1000 + step)
        return torch.randn(n, 4, 2, 4, 4, generator=g), torch.randn(n, 3, 12, generator=g)


def _teacher(seed=0, layers=4):
    torch.manual_seed(seed)
    return DiT(tiny_config(num_layers=layers)).eval()


def _plan(model, drop=(1, 2)):
    return plan_from_drop(model, list(drop), {b: 0.0 for b in range(len(model.blocks))})


def _inputs(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 2, 4, 4, generator=g), torch.rand(B, generator=g) * 1000, torch.randn(B, 3, 12, generator=g)


# ---- Stage II --------------------------------------------------------------------------------

def test_draw_skips_all_off_share_and_probability():
    g = torch.Generator().manual_seed(0)
    assert draw_skips([1, 2, 3], Stage2Config(all_off_share=1.0), g) == [1, 2, 3]
    with pytest.raises(ValueError, match="never skips"):
        draw_skips([1, 2, 3], Stage2Config(all_off_share=0.0, skip_prob=0.0), g)
    with pytest.raises(ValueError, match="at least one candidate"):
        draw_skips([], Stage2Config(), g)
    cfg = Stage2Config(all_off_share=0.25, skip_prob=0.5)
    draws = [draw_skips(list(range(1, 7)), cfg, g) for _ in range(4000)]
    assert all(draws)  # never an empty skip set: pruned mode would equal full mode
    all_off = sum(len(d) == 6 for d in draws) / len(draws)
    per_block = sum(3 in d for d in draws) / len(draws)
    assert abs(all_off - (0.25 + 0.75 / 63)) < 0.03  # all-off steps plus the all-heads draw among non-empty ones
    assert abs(per_block - (0.25 + 0.75 * 0.5 * 64 / 63)) < 0.03


def test_stage2_config_is_strict():
    with pytest.raises(ConfigError, match="stage2.alpha"):
        Stage2Config(alpha=1.5)
    with pytest.raises(ConfigError, match="unknown key 'alpah'"):
        Stage2Config.from_dict({**Stage2Config().to_dict(), "alpah": 1.0})


def test_stage2_loss_is_self_distillation_towards_the_full_mode():
    model = _teacher()
    x, T, c = _inputs()
    t = T / 1000
    target = torch.randn_like(x)
    cfg = Stage2Config(alpha=1.0)
    # nothing skipped: pruned mode is full mode, zero loss
    assert stage2_loss(model, None, x, t, c, target, [], cfg)["loss"].item() < 1e-10
    parts = stage2_loss(model, None, x, t, c, target, [1, 2], cfg)
    with torch.no_grad():
        full = model(x, T, c)
        with skip_blocks(model, [1, 2]):
            pruned = model(x, T, c)
    assert_close(parts["loss"].detach(), ((pruned - full) ** 2).mean(), 1e-6, "alpha 1 loss")
    # alpha 0: the plain flow loss of the pruned mode
    flow = stage2_loss(model, None, x, t, c, target, [1, 2], Stage2Config(alpha=0.0))["loss"]
    assert_close(flow.detach(), ((pruned - target) ** 2).mean(), 1e-6, "alpha 0 loss")
    # the skipped blocks get no gradient; the full-mode target is not differentiated
    parts["loss"].backward()
    assert all(p.grad is None for b in (1, 2) for p in model.blocks[b].parameters())
    assert model.blocks[0].ffn.fc1.weight.grad.abs().sum() > 0


def test_stage2_guided_self_distillation_matches_both_branches_and_the_cfg_velocity():
    model = _teacher()
    x, T, c = _inputs()
    t, target, uncond = T / 1000, torch.randn_like(x), torch.randn(1, 3, 12)
    g = 3.5
    parts = stage2_loss(model, None, x, t, c, target, [1, 2], Stage2Config(guidance=g), uncond=uncond)
    u = uncond.expand(2, -1, -1)
    with torch.no_grad():
        full_c, full_u = model(x, T, c), model(x, T, u)
        with skip_blocks(model, [1, 2]):
            pruned_c, pruned_u = model(x, T, c), model(x, T, u)
    both = (((pruned_c - full_c) ** 2).mean() + ((pruned_u - full_u) ** 2).mean()) / 2
    guided = (((pruned_u + g * (pruned_c - pruned_u)) - (full_u + g * (full_c - full_u))) ** 2).mean() / g**2
    assert_close(parts["loss"].detach(), both + guided, 1e-5, "guided self-distillation")
    assert_close(parts["flow_pruned"], ((pruned_c - target) ** 2).mean(), 1e-5, "flow term on the conditional branch")
    with pytest.raises(ValueError, match="unconditional context"):
        stage2_loss(model, None, x, t, c, target, [1, 2], Stage2Config(guidance=g))
    with pytest.raises(ConfigError, match="stage2.guidance"):
        Stage2Config(guidance=0.5)


def test_stage2_closes_the_gap_between_modes(tmp_path):
    teacher = _teacher()
    plan = _plan(teacher)
    data = FakeData()
    cfg = Stage2Config(steps=30, batch_size=8, lr=3e-3, warmup=0, all_off_share=1.0, eval_every=30, eval_batch=8,
                       checkpoint_every=30)
    model, record = train_stage2(teacher, plan, data, cfg, tmp_path / "s2", progress=False)
    x0, c = data.batch(10**9, 8)
    x_t, t, c, _ = noisy_batch(x0, c, data.uncond, torch.Generator().manual_seed(5), 2.0, 0.0)

    def gap(m):
        with torch.no_grad():
            full = m(x_t, 1000 * t, c)
            with skip_blocks(m, plan.drop):
                return ((m(x_t, 1000 * t, c) - full) ** 2).mean().item()

    assert gap(model) < 0.5 * gap(teacher)
    assert record["steps"] == 30
    assert set(record["heldout_flow_loss"]["end"]) == {"eval_full", "eval_pruned", "gap_cond", "gap_uncond"}
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), _teacher().parameters()))  # teacher untouched


def test_stage2_anchor_holds_the_full_mode_to_the_teacher(tmp_path):
    """Pure self-distillation lets the shared weights drift (both modes move together);
    the anchor to the frozen teacher keeps the full mode where the teacher is."""
    teacher, data = _teacher(), FakeData()
    x0, c = data.batch(10**9, 8)
    x_t, t, c, _ = noisy_batch(x0, c, data.uncond, torch.Generator().manual_seed(5), 2.0, 0.0)
    with torch.no_grad():
        ref = teacher(x_t, 1000 * t, c)

    def full_mode_drift(anchor):
        cfg = Stage2Config(steps=30, batch_size=8, lr=3e-3, warmup=0, anchor=anchor, eval_every=30, eval_batch=8,
                           checkpoint_every=30)
        model, record = train_stage2(teacher, _plan(teacher), data, cfg, tmp_path / f"a{anchor}", progress=False)
        with torch.no_grad():
            return ((model(x_t, 1000 * t, c) - ref) ** 2).mean().item(), record

    free, record = full_mode_drift(0.0)
    held, _ = full_mode_drift(1.0)
    assert held < 0.5 * free, (held, free)
    drift = record["heldout_flow_loss"]["full_mode_drift"]
    ends = record["heldout_flow_loss"]
    assert drift == pytest.approx(ends["end"]["eval_full"] / ends["start"]["eval_full"])


# ---- Stage III -------------------------------------------------------------------------------

def test_real_velocity_formulas():
    real = _teacher()
    x, T, c = _inputs()
    unc = torch.zeros(1, 3, 12)
    with torch.no_grad():
        u_c, u_u = real(x, T, c), real(x, T, unc.expand(2, -1, -1))
        with skip_blocks(real, [1, 2]):
            p_c, p_u = real(x, T, c), real(x, T, unc.expand(2, -1, -1))
    got = real_velocity(real, [1, 2], x, T, c, unc, 3.5, 0.25, "well-guided")
    assert_close(got, p_u + 3.5 * (p_c - p_u) + 0.25 * (u_c - p_c), 1e-5, "well-guided")
    assert_close(real_velocity(real, [1, 2], x, T, c, unc, 3.5, 0.25, "cfg"), u_u + 3.5 * (u_c - u_u), 1e-5, "cfg")
    assert len(real.blocks) == 4
    # per-sample b1 (stage3.low_noise_b1: the low-noise expert's samples take their own guidance)
    b1 = torch.tensor([1.0, 3.5]).view(2, 1, 1, 1, 1)
    got = real_velocity(real, [1, 2], x, T, c, unc, b1, 0.25, "well-guided")
    assert_close(got, p_u + b1 * (p_c - p_u) + 0.25 * (u_c - p_c), 1e-5, "per-sample b1")
    with pytest.raises(ConfigError, match="stage3.low_noise_b1"):
        Stage3Config(low_noise_b1=-1.0)


def test_dmd_gradient_is_the_normalised_score_difference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 2, 4, 4, generator=g, requires_grad=True)
    fake, real = torch.randn(2, 4, 2, 4, 4, generator=g), torch.randn(2, 4, 2, 4, 4, generator=g)
    dmd_loss(x, fake, real).backward()
    weight = (x.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    assert_close(x.grad, (fake - real) / weight / x.numel(), 1e-6, "dmd grad")


def test_backward_simulation_runs_earlier_steps_without_gradients():
    student = _teacher()
    noise, _, c = _inputs()
    sigmas = Stage3Config().sigmas()
    assert [round(s, 2) for s in sigmas] == [1.0, 0.94, 0.83, 0.62]
    out = student_x0(student, noise, c, sigmas, 2, torch.Generator().manual_seed(3))
    # the same thing by hand
    g = torch.Generator().manual_seed(3)
    x = noise
    with torch.no_grad():
        for i in range(2):
            x0 = x - sigmas[i] * student(x, torch.full((2,), 1000 * sigmas[i]), c)
            x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * torch.randn(x.shape, generator=g)
    assert_close(out.detach(), x - sigmas[2] * student(x, torch.full((2,), 1000 * sigmas[2]), c).detach(), 1e-6, "k=2")
    assert out.requires_grad


def test_stage3_keeps_the_best_checkpoint_not_the_last(tmp_path):
    teacher = _teacher()
    plan = _plan(teacher)
    seen = []

    def evaluate(student):  # a made-up score that peaks at the second evaluation
        seen.append(copy.deepcopy(student.state_dict()))
        return {"adherence": [0.2, 0.9, 0.5, 0.4][len(seen) - 1], "frechet": 1.0, "motion_ratio": 1.0, "videos": 100}

    cfg = Stage3Config(steps=6, batch_size=2, fake_updates=2, eval_every=2, checkpoint_every=3, lr_student=1e-3)
    student, record = train_stage3(teacher, plan, FakeData(), cfg, tmp_path / "s3", evaluate=evaluate, progress=False)
    assert len(seen) == 4  # step 0, 2, 4, 6
    assert record["selected"]["step"] == 2 and record["selected"]["metrics"]["adherence"] == 0.9
    assert all(torch.equal(v, seen[1][k]) for k, v in student.state_dict().items())
    assert not all(torch.equal(v, seen[3][k]) for k, v in student.state_dict().items())  # training moved on
    assert student.config.block_ids == plan.keep and len(student.blocks) == 2
    assert [e["step"] for e in record["evaluations"]] == [0, 2, 4, 6]


def test_selection_prefers_lower_frechet_within_the_adherence_noise():
    def ev(step, adherence, frechet, motion=1.0):
        return {"step": step, "metrics": {"adherence": adherence, "frechet": frechet, "motion_ratio": motion,
                                          "videos": 180}}

    # best 0.839 on 180 videos: one standard error is 0.0274, so 0.828 is as good, at less than half the distance
    assert select([ev(200, 0.778, 391), ev(250, 0.828, 316), ev(300, 0.839, 718)])["step"] == 250
    # beyond one standard error adherence decides
    assert select([ev(250, 0.80, 316), ev(300, 0.839, 718)])["step"] == 300
    # motion beyond 15% of the true speed is out while another checkpoint is in
    assert select([ev(250, 0.83, 100, motion=1.3), ev(300, 0.82, 500)])["step"] == 300
    assert select([ev(250, 0.83, 100, motion=1.3)])["step"] == 250
    # image to video: within the adherence noise, appearance kept (its own standard error) before Frechet distance
    def iv(step, adherence, appearance, frechet):
        e = ev(step, adherence, frechet)
        e["metrics"]["appearance_kept"] = appearance
        return e

    assert select([iv(100, 0.822, 0.667, 427), iv(150, 0.878, 0.717, 224), iv(300, 0.9, 0.6, 307)])["step"] == 150
    assert select([iv(150, 0.878, 0.70, 224), iv(300, 0.9, 0.72, 307)])["step"] == 150  # 0.02 is within noise
    assert select([iv(150, 0.878, 0.60, 224), iv(300, 0.9, 0.72, 307)])["step"] == 300
    with pytest.raises(ValueError, match="no evaluations"):
        select([])


@pytest.mark.parametrize("extra", [{}, {"gan": 1.0, "gan_fake": 1.0, "lr_fake": 1e-2}], ids=["dmd", "gan"])
def test_stage3_extends_a_finished_run_as_if_it_had_been_longer(tmp_path, extra):
    """(with the adversarial term: its realism head and optimiser state resume with the run)"""
    teacher = _teacher()
    plan = _plan(teacher)

    def evaluate(student):
        return {"adherence": 0.5, "frechet": float(sum(p.detach().sum() for p in student.parameters())), "motion_ratio": 1.0}

    def run(out, steps):
        cfg = Stage3Config(steps=steps, batch_size=2, fake_updates=1, eval_every=2, checkpoint_every=2, lr_student=1e-2,
                           **extra)
        return train_stage3(teacher, plan, FakeData(), cfg, tmp_path / out, evaluate=evaluate, progress=False)

    run("short", 2)                      # a finished 2-step run ...
    _, extended = run("short", 4)        # ... resumed with steps 4
    _, whole = run("whole", 4)
    assert extended["steps"] == 4 and [e["step"] for e in extended["evaluations"]] == [0, 2, 4]
    assert extended["evaluations"] == whole["evaluations"]  # the same weights at every evaluation
    assert whole["evaluations"][1]["metrics"] != whole["evaluations"][2]["metrics"]  # and they moved
    with pytest.raises(ValueError, match="at step 4, past stage3.steps=2"):  # never chosen from a longer run
        run("short", 2)
    with pytest.raises(ValueError, match="another recipe"):  # what a run computes still must match
        train_stage3(teacher, plan, FakeData(), Stage3Config(steps=6, batch_size=2, fake_updates=1, lr_student=1e-3),
                     tmp_path / "short", progress=False)


def test_stage3_baseline_switches(tmp_path):
    teacher = _teacher()
    cfg = Stage3Config(steps=1, batch_size=2, fake_updates=1, real_score="cfg", prune=False)
    student, _ = train_stage3(teacher, None, FakeData(), cfg, tmp_path / "dmd2", progress=False)
    assert len(student.blocks) == 4  # DMD2 at full size
    with pytest.raises(ValueError, match="needs a plan"):
        train_stage3(teacher, None, FakeData(), Stage3Config(steps=1), tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="stage3.real_score"):
        Stage3Config(real_score="best")


def _captured_run(tmp_path, name, **over):
    """Stage III on the tiny teacher with an evaluation after every step; returns the
    evaluated weights (step 0, 1, 2) and the record."""
    teacher = _teacher()
    seen = []

    def evaluate(student):
        seen.append({k: v.clone() for k, v in student.state_dict().items()})
        return {"adherence": 0.5, "frechet": 1.0, "motion_ratio": 1.0}

    cfg = Stage3Config(steps=2, batch_size=2, fake_updates=1, eval_every=1, lr_student=1e-2, **over)
    _, record = train_stage3(teacher, _plan(teacher), FakeData(), cfg, tmp_path / name, evaluate=evaluate,
                             progress=False)
    return seen, record


def test_stage3_ema_weights_are_evaluated(tmp_path):
    raw, _ = _captured_run(tmp_path, "raw")
    ema, _ = _captured_run(tmp_path, "ema", ema_decay=0.5)
    # EMA starts at the initial weights; the update after step 0 mixes in the weights after it
    # with the warm-up weight d = min(0.5, 1/10) = 0.1; the evaluation at step 2 sees that EMA
    for k, v in ema[2].items():  # (buffers are equal in both runs, so the mix holds for them too)
        if v.is_floating_point():
            assert_close(v, 0.1 * raw[0][k] + 0.9 * raw[1][k], 1e-6, k)
    assert any(not torch.equal(ema[2][k], raw[2][k]) for k in raw[2])
    with pytest.raises(ConfigError, match="stage3.ema_decay"):
        Stage3Config(ema_decay=1.0)


def test_stage3_regression_pulls_the_first_step_to_the_teacher_sample(tmp_path):
    teacher = _teacher()
    plan = _plan(teacher)
    calls = []

    def target(noise, context):  # a made-up "teacher sample": a fixed function of the same noise
        calls.append((noise.clone(), context.shape))
        return 0.5 * noise.flip(-1)

    def first_step_error(student):
        noise, _, context = _inputs(B=4, seed=3)
        sigma0 = Stage3Config().sigmas()[0]
        x0 = noise - sigma0 * student(noise, torch.full((4,), 1000 * sigma0), context)
        return float(((x0 - 0.5 * noise.flip(-1)) ** 2).mean())

    errors = {}
    for weight in (0.0, 20.0):
        cfg = Stage3Config(steps=8, batch_size=2, fake_updates=1, lr_student=3e-3, regression=weight)
        student, _ = train_stage3(teacher, plan, FakeData(), cfg, tmp_path / f"reg{weight}", progress=False,
                                  regression_target=target if weight else None)
        errors[weight] = first_step_error(student)
    assert len(calls) == 8 and calls[0][0].shape == (2, 4, 2, 4, 4) and calls[0][1] == (2, 3, 12)
    assert errors[20.0] < 0.8 * errors[0.0], errors
    log = (tmp_path / "reg20.0" / "metrics.jsonl").read_text()
    assert '"regression"' in log
    with pytest.raises(ValueError, match="regression_target"):
        train_stage3(teacher, plan, FakeData(), Stage3Config(steps=1, regression=1.0), tmp_path / "x", progress=False)


def test_data_denoise_loss_is_the_students_x0_error_at_its_own_sigma():
    from flgengine.conditioning import latent_condition

    sigmas = Stage3Config().sigmas()  # about 1.0, 0.94, 0.83, 0.63
    x0, _, context = _inputs(B=3, seed=5)
    x0 = torch.cat([x0, x0.flip(2)], dim=2)  # (3, 4, 4, 4, 4): four frames

    def student(x, t, c):  # any velocity: a fixed function of its inputs
        return 0.3 * x - 0.001 * t.view(-1, 1, 1, 1, 1) + c.mean()

    loss = data_denoise_loss(student, x0, context, sigmas, [3], torch.Generator().manual_seed(7))
    # the same draws by hand: the step index (one choice), then the noise
    g = torch.Generator().manual_seed(7)
    assert int(torch.randint(1, (), generator=g)) == 0
    eps = torch.randn(x0.shape, generator=g).double()
    s = sigmas[3]
    x0d = x0.double()
    x_t = (1 - s) * x0d + s * eps
    x0_hat = x_t - s * (0.3 * x_t - 0.001 * 1000 * s + context.double().mean())
    assert abs(loss.item() - ((x0_hat - x0d) ** 2).mean().item()) < 1e-6
    l1 = data_denoise_loss(student, x0, context, sigmas, [3], torch.Generator().manual_seed(7), norm="l1")
    assert abs(l1.item() - (x0_hat - x0d).abs().mean().item()) < 1e-6  # the same draws, the absolute error
    # the first_frame condition puts the given frame back: frame 0 costs nothing
    cond = latent_condition("first_frame", x0[:, :, :1].clone(), 4, 1, (1, 2, 2))
    with_image = data_denoise_loss(student, x0, context, sigmas, [3], torch.Generator().manual_seed(7), cond)
    err = (x0_hat - x0d) ** 2
    err[:, :, 0] = 0
    assert abs(with_image.item() - err.mean().item()) < 1e-6
    # steps: null = every student step but the first; validated against num_steps
    assert Stage3Config().denoise_steps() == [1, 2, 3]
    assert Stage3Config(num_steps=2, data_denoise_steps=[1]).denoise_steps() == [1]
    for bad in ([], [4], [-1], [True], [1.0]):
        with pytest.raises(ConfigError, match="stage3.data_denoise_steps"):
            Stage3Config(data_denoise_steps=bad)
    with pytest.raises(ConfigError, match="stage3.data_denoise"):
        Stage3Config(data_denoise=-1.0)
    with pytest.raises(ConfigError, match="stage3.data_denoise_norm"):
        Stage3Config(data_denoise_norm="l2")


class FixedData(FakeData):
    """The same batch at every step: a clip the student can learn to give back."""

    def batch(self, step, n):
        return super().batch(0, n)


def test_stage3_data_denoise_teaches_the_last_step_the_data(tmp_path):
    teacher = _teacher()
    plan = _plan(teacher)
    s = Stage3Config().sigmas()[-1]
    x0, context = FixedData().batch(0, 2)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(11))
    x_t = (1 - s) * x0 + s * eps

    def last_step_error(student):
        with torch.no_grad():
            return float(((x_t - s * student(x_t, torch.full((2,), 1000 * s), context) - x0) ** 2).mean())

    errors = {}
    for weight in (0.0, 20.0):
        cfg = Stage3Config(steps=8, batch_size=2, fake_updates=1, lr_student=3e-3, data_denoise=weight,
                           data_denoise_steps=[3])
        student, _ = train_stage3(teacher, plan, FixedData(), cfg, tmp_path / f"dn{weight}", progress=False)
        errors[weight] = last_step_error(student)
    assert errors[20.0] < 0.8 * errors[0.0], errors
    assert '"data_denoise"' in (tmp_path / "dn20.0" / "metrics.jsonl").read_text()


def test_stage3_without_dmd_is_the_data_term_alone(tmp_path):
    """dmd 0: the teacher no longer reaches the student (two different real scores train the same
    student, bit for bit), the fake score is never updated, and the data term still teaches."""
    from distill.checkpoint import load_checkpoint

    cfg = Stage3Config(steps=4, batch_size=2, fake_updates=2, lr_student=3e-3, dmd=0.0, data_denoise=1.0,
                       data_denoise_steps=[3], checkpoint_every=2)
    init = _teacher(0)  # the student and the fake score start from it; the real score differs
    students = []
    for seed in (0, 1):
        real = _teacher(seed)
        student, _ = train_stage3(real, _plan(real), FixedData(), cfg, tmp_path / f"t{seed}", init=init, progress=False)
        students.append(student.state_dict())
        fake = load_checkpoint(tmp_path / f"t{seed}" / "checkpoint.safetensors")["modules"]["fake"]
        for name, w in init.state_dict().items():  # the fake score never moves
            torch.testing.assert_close(fake[name], w, rtol=0, atol=0)
    for name, w in students[0].items():
        torch.testing.assert_close(students[1][name], w, rtol=0, atol=0)
    assert not torch.equal(students[0]["head.proj.weight"], init.state_dict()["head.proj.weight"])  # it learnt
    rows = [json.loads(line) for line in (tmp_path / "t0" / "metrics.jsonl").read_text().splitlines()]
    assert all("fake_loss" not in r and "data_denoise" in r for r in rows)
    real = _teacher(1)  # DMD on, the rest alike: the teacher reaches the student
    with_dmd, _ = train_stage3(real, _plan(real), FixedData(), dataclasses_replace(cfg, dmd=1.0), tmp_path / "dmd",
                               init=init, progress=False)
    assert any(not torch.equal(with_dmd.state_dict()[n], w) for n, w in students[0].items())


def test_stage3_dmd_weight_is_checked():
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ConfigError, match="stage3.dmd"):
            Stage3Config(dmd=bad)
    with pytest.raises(ConfigError, match="stage3.dmd must be > 0 unless another term"):
        Stage3Config(dmd=0.0)  # nothing would train the student
    assert Stage3Config(dmd=0.0, data_denoise=1.0).dmd == 0.0
    assert Stage3Config.added_later()["dmd"] == 1.0  # a run from before the key resumes with DMD on


class WideData(FakeData):
    """Latents (B, 4, 4, 8, 12): a 4 x 4 x 6 token grid, enough for a block-sparse pattern."""

    def batch(self, step, n):
        g = torch.Generator().manual_seed(2000 + step)
        return torch.randn(n, 4, 4, 8, 12, generator=g), torch.randn(n, 3, 12, generator=g)


LOCAL = {"kind": "tile_window", "tile": [2, 2, 3], "window": [1, 1, 1], "block": 16, "head_windows": None}


def test_pattern_adaptation_brings_the_sparse_student_to_its_dense_velocity(tmp_path):
    """stage3.adapt_steps (distill/adapt.py): the student with a block-sparse pattern learns its
    own dense velocity at the sampler's steps, before the DMD steps."""
    torch.manual_seed(0)
    dense = DiT(tiny_config(num_heads=2, head_dim=16, ffn_dim=48, num_layers=2)).eval()
    with torch.no_grad():  # away from the zero-initialised gates, so attention matters
        for p in dense.parameters():
            p.add_(0.2 * torch.randn_like(p))
    sigmas = Stage3Config().sigmas()
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(8, 4, 4, 8, 12, generator=g), torch.randn(8, 3, 12, generator=g)

    def gap(net):  # relative velocity error against the dense network at every sampler step
        with torch.no_grad():
            errs = [((net(x, torch.full((8,), 1000 * s), ctx) - dense(x, torch.full((8,), 1000 * s), ctx)).norm()
                     / dense(x, torch.full((8,), 1000 * s), ctx).norm()).item() for s in sigmas]
        return sum(errs) / len(errs)

    before = copy.deepcopy(dense)
    before.set_attention(LOCAL)
    assert before.sparse.density((4, 4, 6)) < 0.5 and gap(before) > 0.05
    cfg = Stage3Config(steps=1, batch_size=4, fake_updates=1, real_score="cfg", prune=False, lr_student=1e-12,
                       lr_fake=1e-12, attention=LOCAL, adapt_steps=40, adapt_lr=1e-4, checkpoint_every=10)
    student, record = train_stage3(dense, None, WideData(), cfg, tmp_path / "s3", progress=False, student_init=dense)
    assert student.config.attention.to_dict() == LOCAL
    # a random network has little to adapt with (a trained student: 0.48 -> 0.72 adherence in 300
    # steps, bench/RESULTS.md); a step against the gradient would widen the gap, as a too large lr does
    assert gap(student) < 0.95 * gap(before), (gap(student), gap(before))
    adapt = record["adapt"]
    assert adapt["stage"] == "adapt" and adapt["steps"] == 40 and adapt["recipe"]["attention"] == LOCAL
    assert 0 < adapt["loss_first"] < 1 and 0 < adapt["loss_last"] < 1
    assert (tmp_path / "s3" / "adapt" / "checkpoint.safetensors").is_file()
    # a resumed run finds the adaptation done and gives the same student
    again, _ = train_stage3(dense, None, WideData(), cfg, tmp_path / "s3", progress=False, student_init=dense)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in student.state_dict().items())
    with pytest.raises(ConfigError, match="stage3.adapt_steps"):
        Stage3Config(adapt_steps=10)  # no pattern to adapt to
    with pytest.raises(ConfigError, match="stage3.adapt_steps"):
        Stage3Config(adapt_steps=-1, attention=LOCAL)
    with pytest.raises(ConfigError, match="stage3.adapt_lr"):
        Stage3Config(adapt_steps=1, adapt_lr=0.0, attention=LOCAL)
    with pytest.raises(ConfigError, match="stage3.adapt_schedule"):
        Stage3Config(adapt_steps=1, adapt_schedule="linear", attention=LOCAL)


def test_fp8_aware_student_trains_through_fp8_numerics_and_ships_plain(tmp_path):
    """stage3.precision "fp8": the student's forward is FP8's emulated numerics (fake_fp8: the
    same function as to_fp8 of the same weights), gradients reach the float weights, and the
    result is an ordinary network to run with precision="fp8"."""
    from flgengine.model.precision import FakeFP8Linear, fake_fp8, to_fp8

    teacher = _teacher()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t, ctx = _inputs(B=2, seed=4)
    fake, real8 = fake_fp8(copy.deepcopy(teacher)), to_fp8(copy.deepcopy(teacher))
    with torch.no_grad():
        want, plain = real8(x, t, ctx), teacher(x, t, ctx)
    got = fake(x, t, ctx)
    assert_close(got, want, 1e-5, "fake_fp8 vs to_fp8")
    assert (got - plain).abs().max() > 1e-4  # FP8 rounding changes the function
    got.square().mean().backward()
    lin = fake.blocks[0].self_attn.q
    assert isinstance(lin, FakeFP8Linear) and lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert fake.blocks[0].ffn.fc1.weight.grad.abs().sum() > 0

    seen = []

    def evaluate(student):
        seen.append(isinstance(student.blocks[0].ffn.fc2, FakeFP8Linear) and student.blocks[0].self_attn.precision)
        return {"adherence": 0.5, "frechet": 1.0 / len(seen), "motion_ratio": 1.0}  # the last is chosen

    cfg = Stage3Config(steps=2, batch_size=2, fake_updates=1, eval_every=1, lr_student=1e-3, real_score="cfg",
                       prune=False, precision="fp8")
    student, record = train_stage3(teacher, None, FakeData(), cfg, tmp_path / "s3", evaluate=evaluate, progress=False,
                                   student_init=teacher)
    assert seen == ["fp8", "fp8", "fp8"]  # evaluated in FP8
    assert not any(isinstance(m, FakeFP8Linear) for m in student.modules())
    assert student.blocks[0].self_attn.precision is None and record["recipe"]["precision"] == "fp8"
    assert any(not torch.equal(v, teacher.state_dict()[k]) for k, v in student.state_dict().items())
    with pytest.raises(ConfigError, match="stage3.precision"):
        Stage3Config(precision="fp4")
    with pytest.raises(ConfigError, match="stage3.precision"):
        Stage3Config(precision="fp8", device="cuda")


def test_fp8_adaptation_alone_trains_the_fp8_student_towards_its_fp32_self(tmp_path):
    """stage3.adapt_steps with precision "fp8" and steps 0: the student, in FP8's numerics, learns
    its own fp32 velocity (distill/adapt.py), no DMD step follows, and the evaluation runs in FP8.
    (On the shapes world it wins back the videos FP8 loses: bench/RESULTS.md; a random tiny network's
    FP8 error is rounding noise with nothing to learn, so here the mechanism is checked.)"""
    torch.manual_seed(0)
    dense = DiT(tiny_config(num_heads=2, head_dim=16, ffn_dim=48, num_layers=2)).eval()
    with torch.no_grad():  # away from the zero-initialised gates, so every linear matters
        for p in dense.parameters():
            p.add_(0.2 * torch.randn_like(p))
    seen = []
    cfg = Stage3Config(steps=0, batch_size=4, fake_updates=1, real_score="cfg", prune=False, precision="fp8",
                       adapt_steps=6, adapt_lr=1e-4, adapt_schedule="cosine", checkpoint_every=3)
    student, record = train_stage3(dense, None, FakeData(), cfg, tmp_path / "s3", progress=False, student_init=dense,
                                   evaluate=lambda s: seen.append(s.blocks[0].self_attn.precision) or
                                   {"adherence": 0.5, "frechet": 1.0, "motion_ratio": 1.0})
    assert seen == ["fp8"] and record["steps"] == 0 and record["selected"]["step"] == 0  # adapted, then evaluated
    adapt = record["adapt"]
    assert adapt["recipe"]["precision"] == "fp8" and adapt["steps"] == 6
    assert adapt["recipe"]["schedule"] == "cosine" and adapt["recipe"]["schedule_steps"] == 6
    last = json.loads((tmp_path / "s3" / "adapt" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 6 and last["lr"] < 0.5e-4  # the last step's lr, decayed along the cosine from 1e-4
    # the target is the network as it was, in fp32: the FP8 student starts away from it (a target
    # copied after the FP8 switch would give exactly 0)
    assert adapt["loss_first"] > 1e-7
    assert any(not torch.equal(v, dense.state_dict()[k]) for k, v in student.state_dict().items())
    with pytest.raises(ConfigError, match="stage3.adapt_steps"):
        Stage3Config(adapt_steps=10)  # bf16, dense: nothing to adapt to
    with pytest.raises(ConfigError, match="stage3.steps"):
        Stage3Config(steps=0)  # no DMD steps and no adaptation: nothing to train
