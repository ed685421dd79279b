"""Several gloo processes on one request give what one process gives: sequence parallel (the
shipped student, 4 heads on 2 and 3 ranks), CFG-parallel (the shipped two-expert teacher), and
the DiT's velocity itself; mistakes are clear errors before compute."""

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import flgengine
from flgengine.parallel import split_sizes

PROMPTS = ["a red circle moving left", "a blue square moving up"]


def _worker(rank, world, init, job, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        kind, model, kw = job
        if model == "tiny-hunyuan":  # the DiT alone: its velocity with the video tokens split
            from flgengine.parallel import set_parallel

            dit = set_parallel(_tiny_hunyuan(**kw), kind)
            torch.save(_hunyuan_velocity(dit), os.path.join(out, f"velocity{rank}.pt"))
            return
        pipe = flgengine.load(model, device="cpu", parallel=kind)
        video = pipe(PROMPTS, seed=3, progress=False, output=os.path.join(out, "v.gif"), **kw)
        torch.save(video, os.path.join(out, f"video{rank}.pt"))  # a test artefact: each rank's frames
        if kind == "sequence":
            torch.save(_velocities(pipe), os.path.join(out, f"velocity{rank}.pt"))
            torch.save(pipe.dit.sequence_parallel.sizes, os.path.join(out, f"sizes{rank}.pt"))  # the split it ran
    finally:
        dist.destroy_process_group()


def _tiny_hunyuan(image_condition=None):
    """A random HunyuanVideo DiT of 3 heads, 2 dual- and 2 single-stream blocks."""
    from flgengine.model.hunyuan import HunyuanVideoConfig, HunyuanVideoDiT

    torch.manual_seed(0)
    dit = HunyuanVideoDiT(HunyuanVideoConfig(in_channels=4, out_channels=4, num_heads=3, head_dim=8, num_layers=2,
                                             num_single_layers=2, num_refiner_layers=1, text_dim=6, pooled_dim=3,
                                             rope_axes=(2, 2, 4), image_condition=image_condition)).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dit


@torch.no_grad()
def _hunyuan_velocity(dit):
    """Two prompts of different real lengths (5 and 2 of 5 tokens), 3 x 4 x 6 = 72 video tokens."""
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 3, 8, 12, generator=g), torch.randn(2, 5, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    kw = dict(context_mask=mask, pooled_text=torch.randn(2, 3, generator=g), guidance=torch.tensor([3000.0, 6000.0]))
    out = [dit(x, torch.tensor([40.0, 800.0]), ctx, **kw)]
    dit.text_mask = "attention"
    out.append(dit(x, torch.tensor([40.0, 800.0]), ctx, **kw))
    dit.text_mask = "truncate"
    return out


@torch.no_grad()
def _velocities(pipe):
    """The DiT's velocity on random inputs, one timestep per sample and one per token."""
    g = torch.Generator().manual_seed(0)
    dit = pipe.dit
    x = torch.randn(2, dit.config.in_channels, 9, 32, 32, generator=g)
    S = 9 * (32 // dit.config.patch_size[1]) * (32 // dit.config.patch_size[2]) // dit.config.patch_size[0]
    ctx = pipe.text_encoder.encode(PROMPTS)
    return dit(x, torch.tensor([3.0, 711.0]), ctx), dit(x, torch.rand(2, S, generator=g) * 1000, ctx)


def _run(world, job):
    out = tempfile.mkdtemp()
    mp.spawn(_worker, args=(world, os.path.join(out, "init"), job, out), nprocs=world, join=True)
    return out


@pytest.mark.parametrize("world,model", [(2, "shapes-4step"), (3, "shapes-4step"), (3, "shapes-4step-sparse")])
def test_sequence_parallel_gives_one_process_video(world, model):
    """4 heads on 3 ranks: an uneven head split (2, 1, 1); the 144 tokens split 48 x 3 (72 x 2).
    The sparse student: tokens in tile-major order split into runs of tiles, each rank's heads
    with their own windows (the per-head block mask sliced to the rank's heads)."""
    out = _run(world, ("sequence", model, {}))
    pipe = flgengine.load(model, device="cpu")
    want = pipe(PROMPTS, seed=3, progress=False)
    for r in range(world):
        got = torch.load(os.path.join(out, f"video{r}.pt"))
        assert (got.float() - want.float()).abs().max() <= 1, r  # within 1/255, on every rank
    assert os.path.exists(os.path.join(out, "v_0.gif"))  # rank 0 wrote the videos
    v, v_tok = _velocities(pipe)
    pt, ph, pw = pipe.dit.config.patch_size
    S = (v.shape[2] // pt) * (v.shape[3] // ph) * (v.shape[4] // pw)  # 144 tokens
    for r in range(world):
        assert torch.load(os.path.join(out, f"sizes{r}.pt")) == split_sizes(S, world)  # each rank ran its share
        pv, pv_tok = torch.load(os.path.join(out, f"velocity{r}.pt"))
        torch.testing.assert_close(pv, v, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pv_tok, v_tok, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world,image_condition", [(2, None), (3, None), (3, "token_replace")])
def test_sequence_parallel_hunyuan_gives_one_process_velocity(world, image_condition):
    """Video tokens split, the text whole on every rank (its heads gathered), 3 heads on 2 and 3
    ranks; both text-mask modes; the image-to-video "token_replace" transformer, whose first
    frame's 24 of 72 tokens (per-token modulation) are rank 0's share on 3 ranks."""
    kw = {"image_condition": image_condition}
    out = _run(world, ("sequence", "tiny-hunyuan", kw))
    want = _hunyuan_velocity(_tiny_hunyuan(**kw))
    for r in range(world):
        for got, w in zip(torch.load(os.path.join(out, f"velocity{r}.pt")), want):
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)


def test_cfg_parallel_two_expert_teacher_gives_one_process_video():
    kw = {"steps": 6}
    out = _run(2, ("cfg", "shapes-teacher", kw))
    want = flgengine.load("shapes-teacher", device="cpu")(PROMPTS, seed=3, progress=False, **kw)
    for r in range(2):
        got = torch.load(os.path.join(out, f"video{r}.pt"))
        assert (got.float() - want.float()).abs().max() <= 1, r


def test_split_sizes_and_clear_errors(capsys):
    assert split_sizes(4, 3) == [2, 1, 1] and split_sizes(36, 3) == [12, 12, 12] and split_sizes(1, 2) == [1, 0]
    with pytest.raises(ValueError, match="needs an initialised process group"):
        flgengine.load("shapes-4step", device="cpu", parallel="sequence")
    with pytest.raises(ValueError, match="parallel='rings' is not one of sequence, cfg"):
        flgengine.load("shapes-4step", device="cpu", parallel="rings")
    from flgengine.__main__ import main

    assert main(["generate", "a red circle moving left", "--parallel", "sequence", "--quiet"]) == 2  # bad input
    assert "launch with torchrun --nproc_per_node N" in capsys.readouterr().err


def test_more_ranks_than_tokens_is_a_clear_error():
    from flgengine.parallel import SequenceParallel

    sp = SequenceParallel.__new__(SequenceParallel)
    sp.world, sp.rank, sp.sizes = 8, 0, []
    with pytest.raises(ValueError, match="over 8 ranks needs at least 8 tokens, this forward has 6"):
        sp.begin(6)


def test_cli_under_torchrun_writes_the_video_once(tmp_path):
    """`torchrun --nproc_per_node 2 -m flgengine generate ... --parallel sequence` (gloo): the CLI
    sets up the process group from torchrun's environment, rank 0 alone writes the video and
    speaks (its peak memory with --verbose), and the video is the one-process video's file."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    args = ["generate", PROMPTS[0], "--model", "shapes-4step", "--device", "cpu", "--seed", "3", "--verbose"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "flgengine", *args, "--parallel", "sequence", "-o", str(tmp_path / "two" / "v.mp4")],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["v.mp4"]  # written once
    assert two.stdout.count("video(s) of") == 1 and two.stdout.count("peak memory:") == 1  # rank 0 speaks
    assert "GiB resident (CPU)" in two.stdout
    from flgengine.__main__ import main

    assert main([*args, "-o", str(tmp_path / "one" / "v.mp4"), "--quiet"]) == 0
    import imageio.v3 as iio

    a, b = iio.imread(tmp_path / "two" / "v.mp4"), iio.imread(tmp_path / "one" / "v.mp4")
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 2  # the same frames, through H.264
