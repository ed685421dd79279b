"""Stage III's adversarial term (distill/gan.py): the realism head, its losses, and the term in a run."""

import copy
import json
import math

import pytest
import torch

from distill.gan import (RealismHead, default_layer, discriminator_loss, frozen, generator_loss, realism_logits,
                         trunk_features)
from distill.stage3 import Stage3Config, train_stage3
from flgengine.config import ConfigError
from flgengine.model import DiT
from helpers import tiny_config
from test_stages import FakeData, FixedData, _plan, _teacher


def _net(seed=0, layers=4):
    torch.manual_seed(seed)
    net = DiT(tiny_config(num_layers=layers)).eval()
    with torch.no_grad():  # away from the zero-initialised gates, so every block changes the stream
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net


def _inputs(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 2, 4, 4, generator=g), torch.rand(B, generator=g) * 1000, torch.randn(B, 3, 12, generator=g)


def test_losses_are_the_logistic_losses_and_the_head_starts_undecided():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    want_d = torch.log1p(torch.exp(-real)).mean() + torch.log1p(torch.exp(fake)).mean()
    assert abs(discriminator_loss(real, fake).item() - want_d.item()) < 1e-12
    assert abs(generator_loss(fake).item() - torch.log1p(torch.exp(-fake)).mean().item()) < 1e-12
    head = RealismHead(16)
    logits = head(torch.randn(2, 5, 16, generator=g))
    assert logits.shape == (2, 5) and torch.equal(logits, torch.zeros(2, 5))  # probability 1/2 everywhere
    assert abs(discriminator_loss(logits, logits).item() - 2 * math.log(2)) < 1e-6
    assert [default_layer(n) for n in (1, 2, 4, 5, 30)] == [0, 0, 1, 2, 14]


def test_trunk_features_are_the_stream_after_the_chosen_block():
    net = _net()
    x, t, ctx = _inputs()
    with trunk_features(net, 1) as seen:
        net(x, t, ctx)
    assert len(seen) == 1 and seen[0].shape == (2, 2 * 2 * 2, net.config.dim) and seen[0].dtype == torch.float32
    later, earlier = copy.deepcopy(net), copy.deepcopy(net)
    with torch.no_grad():
        for p in later.blocks[2].parameters():  # a block after the one read: the features stay
            p.add_(1.0)
        for p in earlier.blocks[1].parameters():  # the block read: they change
            p.add_(1.0)
    for other, same in ((later, True), (earlier, False)):
        with trunk_features(other, 1) as got:
            other(x, t, ctx)
        assert torch.equal(got[0], seen[0]) == same
    net(x, t, ctx)
    assert len(seen) == 1  # the hook is gone after the block
    with pytest.raises(ValueError, match="gan_layer 4"):
        with trunk_features(net, 4):
            pass


def test_generator_loss_reaches_the_sample_not_the_critic():
    net, head = _net(), RealismHead(_net().config.dim)
    with torch.no_grad():
        head.fc2.weight.normal_()  # a head that has learnt something: logits depend on the input
    x, _, ctx = _inputs()
    x.requires_grad_(True)
    t, eps = torch.full((2, 1, 1, 1, 1), 0.3), torch.randn(x.shape)
    with frozen(net, head):
        loss = generator_loss(realism_logits(net, net, head, 1, x, t, eps, ctx))
    assert all(p.requires_grad for p in list(net.parameters()) + list(head.parameters()))  # restored
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in list(net.parameters()) + list(head.parameters()))


def test_stage3_gan_config_is_checked(monkeypatch):
    assert Stage3Config().gan == 0.0  # off unless asked
    for bad in ({"gan": -1.0}, {"gan": float("nan")}, {"gan_fake": -0.1}, {"gan_lr": 0.0}, {"gan_t_max": 0.0}, {"gan_t_max": 1.5},
                {"gan_layer": -1}, {"gan_layer": 1.5}, {"gan": 0.1, "fsdp": True}):
        key = next(iter(bad))
        with pytest.raises(ConfigError, match=f"stage3.{key}"):
            Stage3Config(**bad)
    with pytest.raises(ValueError, match="several processes"):  # under torchrun (DDP): refused before anything runs
        monkeypatch.setattr("distill.stage3.distributed", lambda: (0, 2))
        train_stage3(_teacher(), None, FakeData(), Stage3Config(steps=1, batch_size=2, fake_updates=1, real_score="cfg",
                                                                prune=False, gan=0.1), "/nonexistent/x", progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="gan_layer 9 is not a block"):
        train_stage3(_teacher(), None, FakeData(), Stage3Config(steps=1, batch_size=2, fake_updates=1, real_score="cfg",
                                                                prune=False, gan=0.1, gan_layer=9), "/nonexistent/x",
                     progress=False)


def test_stage3_gan_head_learns_to_tell_real_clips_from_the_students(tmp_path):
    """A tiny run with the term on: the head (and trunk) separate the fixed real clip from the
    student's samples (its logistic loss falls well below 2 log 2, where it starts), the student
    gets the adversarial loss, and the head is checkpointed with the run."""
    teacher = _teacher()
    cfg = Stage3Config(steps=40, batch_size=2, fake_updates=1, lr_fake=1e-3, gan_lr=1e-2, lr_student=1e-4, gan=0.1, gan_fake=1.0,
                       gan_t_max=0.2, checkpoint_every=20)
    train_stage3(teacher, _plan(teacher), FixedData(), cfg, tmp_path / "gan", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "gan" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 40 and "gan_g" in rows[-1]
    assert rows[-1]["gan_d"] < 0.7 * 2 * math.log(2), rows
    from distill.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "gan" / "checkpoint.safetensors")
    assert set(state["modules"]) == {"student", "fake", "realism"}
    assert state["modules"]["realism"]["fc2.weight"].abs().sum() > 0  # it learnt (it starts at zero)

