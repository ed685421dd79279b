"""`python -m distill calibrate-attention`: per-head windows from attention maps of known structure,
and the command end to end on the shipped student."""

import json
import subprocess
import sys

import torch

from distill.calibrate import calibrate
from flgengine.bundle import load_bundle


def _maps():
    # grid 3 x 4 x 4 (48 tokens), row-major; head 0 attends uniformly within its own frame,
    # head 1 uniformly to the same position in every frame
    S = 48
    f = torch.arange(S) // 16
    pos = torch.arange(S) % 16
    within_frame = (f[:, None] == f[None, :]).float()
    same_place = (pos[:, None] == pos[None, :]).float()
    p = torch.stack([within_frame / within_frame.sum(-1, keepdim=True), same_place / same_place.sum(-1, keepdim=True)])
    return p[None, None]  # (1, 1, 2, S, S)


def test_heads_get_the_window_their_attention_needs():
    grid, tile, block = (3, 4, 4), (1, 2, 2), 16  # a mask block is one frame
    rich = calibrate(_maps(), grid, tile, block, budget=0.7)
    w0, w1 = (h["window"] for h in rich["heads"])
    assert rich["heads"][0]["mass"] == 1.0 and rich["heads"][1]["mass"] == 1.0
    assert rich["heads"][0]["density"] < 0.34 and w0[0] == 1  # one frame is enough for head 0
    assert rich["heads"][1]["density"] == 1.0  # head 1 needs every frame
    assert rich["density"] <= 0.7
    poor = calibrate(_maps(), grid, tile, block, budget=0.5)  # no room for head 1's window
    assert poor["density"] <= 0.5 and poor["heads"][1]["mass"] < 1.0
    assert poor["attention"].kind == "per_head" and len(poor["attention"].head_windows) == 2


def test_calibrate_command_writes_a_per_head_bundle(tmp_path):
    r = subprocess.run([sys.executable, "-m", "distill", "calibrate-attention", "shapes-4step", "--budget", "0.4",
                        "--prompts", "4", "-o", str(tmp_path / "b")], capture_output=True, text=True, check=True)
    chosen = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][0])["attention"]
    model = load_bundle(tmp_path / "b").model
    assert model.config.attention.to_dict() == chosen and chosen["kind"] == "per_head"
    assert model.sparse.density((9, 4, 4)) <= 0.4 + 1e-9
    assert (tmp_path / "b" / "text_encoder").is_dir()
