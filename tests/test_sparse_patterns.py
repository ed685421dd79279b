"""Block-sparse self-attention patterns in the model (flgengine/model/sparsity.py): the
tile-major token order, the window masks against a token-level definition, the DiT with a
pattern against the dense DiT, the config section and its errors, and `info`."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import pytest
import torch

from flgengine.bundle import load_bundle, save_bundle
from flgengine.config import AttentionConfig, ConfigError, ModelConfig
from flgengine.model import DiT
from flgengine.model.sparsity import tile_major_order, window_block_mask
from helpers import assert_close, rel_err, tiny_config


def test_tile_major_order_puts_each_tile_in_a_run():
    grid, tile = (3, 5, 7), (2, 2, 3)  # partial tiles on every axis
    perm = tile_major_order(grid, tile)
    S = math.prod(grid)
    assert sorted(perm.tolist()) == list(range(S))
    f, h, w = perm // 35, (perm % 35) // 7, perm % 7
    tiles = list(zip((f // 2).tolist(), (h // 2).tolist(), (w // 3).tolist()))
    runs = [k for k, _ in itertools.groupby(tiles)]
    assert len(runs) == len(set(runs)) == 2 * 3 * 3  # every tile one run of consecutive tokens
    assert runs == sorted(runs)  # tiles in frame, row, column order


def test_window_mask_against_the_token_level_definition():
    grid, tile, block = (3, 4, 6), (1, 2, 3), 16
    windows = [(1, 1, 1), (3, 1, 1), (1, 3, 3), (5, 5, 5)]
    bm = window_block_mask(grid, tile, windows, block)
    perm = tile_major_order(grid, tile)
    f, h, w = perm // 24, (perm % 24) // 6, perm % 6
    tc = torch.stack([f // tile[0], h // tile[1], w // tile[2]], 1)  # tile coords in tile-major order
    n = math.ceil(perm.numel() / block)
    for head, win in enumerate(windows):
        r = torch.tensor([x // 2 for x in win])
        near = ((tc[:, None] - tc[None, :]).abs() <= r).all(-1)  # token pairs within the window
        expect = torch.zeros(n, n, dtype=torch.bool)
        for i, j in itertools.product(range(n), range(n)):
            expect[i, j] = near[i * block:(i + 1) * block, j * block:(j + 1) * block].any()
        assert torch.equal(bm.mask[head], expect), win
    assert bm.mask[3].all()  # a window covering the grid: dense
    assert bm.density() < 1.0 and bm.mask[0].diagonal().all()


def _model(attention=None, **kw):
    cfg = tiny_config(num_heads=2, head_dim=16, ffn_dim=48, num_layers=2, attention=attention, **kw)
    torch.manual_seed(0)
    return DiT(cfg).eval()


def _inputs(cfg, F=4, H=8, W=12, per_token=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, F, H, W, generator=g)
    S = F * (H // 2) * (W // 2)
    t = torch.rand(2, S, generator=g) * 1000 if per_token else torch.tensor([700.0, 300.0])
    return x, t, torch.randn(2, 5, cfg.text_dim, generator=g)


WIDE = dict(kind="tile_window", tile=[2, 2, 3], window=[5, 5, 5], block=16, head_windows=None)  # covers the grid


@pytest.mark.parametrize("per_token", [False, True])
def test_dense_attention_in_tile_major_order_equals_row_major(per_token):
    dense = _model()
    tiled = _model(WIDE)
    tiled.load_state_dict(dense.state_dict())
    x, t, ctx = _inputs(dense.config, per_token=per_token)
    with torch.no_grad():
        a, b = dense(x, t, ctx), tiled(x, t, ctx)
    assert tiled.sparse.for_grid((4, 4, 6), "cpu")[2].is_dense  # every tile: only the order changed
    assert not torch.equal(tiled.sparse.for_grid((4, 4, 6), "cpu")[0], torch.arange(96))
    assert_close(b, a, 1e-5, "tile-major vs row-major")


def test_a_local_window_changes_the_function_and_skips_work():
    local = dict(WIDE, window=[1, 1, 1])
    dense, sparse = _model(), _model(local)
    sparse.load_state_dict(dense.state_dict())
    x, t, ctx = _inputs(dense.config)
    with torch.no_grad():
        err = rel_err(sparse(x, t, ctx), dense(x, t, ctx))
    assert err > 1e-3
    assert sparse.sparse.density((4, 4, 6)) < 0.5
    # the training-free switch: the dense model given the pattern computes the sparse function
    dense.set_attention(local)
    with torch.no_grad():
        assert_close(dense(x, t, ctx), sparse(x, t, ctx), 1e-6, "set_attention")


def test_attention_config_is_stored_and_checked(tmp_path):
    model = _model(dict(WIDE, window=[1, 3, 3]))
    save_bundle(tmp_path / "b", model)
    saved = json.loads((tmp_path / "b" / "config.json").read_text())["attention"]
    assert saved == {"kind": "tile_window", "tile": [2, 2, 3], "window": [1, 3, 3], "block": 16, "head_windows": None}
    back = load_bundle(tmp_path / "b").model
    assert back.config.attention == model.config.attention and back.sparse is not None
    for bad, match in ((dict(WIDE, kind="radial"), "attention.kind must be one of"),
                       (dict(WIDE, window=[0, 1, 1]), r"attention.window must be 3 integers >= 1"),
                       (dict(WIDE, window=[2, 1, 1]), "attention.window must be odd"),
                       (dict(WIDE, tile=[1, 1]), r"attention: key 'tile' = \[1, 1\]: expected a list of 3"),
                       (dict(WIDE, block=24), "attention.block must be a power of two"),
                       (dict(WIDE, kind="per_head", head_windows=[[1, 1, 1]]), "must list 2 windows")):
        with pytest.raises(ConfigError, match=match):
            tiny_config(num_heads=2, head_dim=16, attention=bad)
    too_big = _model(dict(WIDE, tile=[8, 2, 2]))
    x, t, ctx = _inputs(too_big.config)
    with pytest.raises(ValueError, match=r"attention.tile=\[8, 2, 2\] is larger than the token grid \[4, 4, 6\]"):
        too_big(x, t, ctx)


def test_per_head_windows():
    heads = dict(kind="per_head", tile=[1, 2, 3], window=[1, 1, 1], block=16, head_windows=[[5, 1, 1], [1, 5, 5]])
    model = _model(heads)
    _, _, bm = model.sparse.for_grid((4, 4, 6), "cpu")
    assert bm.heads == 2 and not torch.equal(bm.mask[0], bm.mask[1])  # time-local vs space-local
    x, t, ctx = _inputs(model.config)
    with torch.no_grad():
        assert torch.isfinite(model(x, t, ctx)).all()


def test_info_reports_the_pattern_and_its_density(tmp_path):
    src = load_bundle("flgengine/assets/shapes-4step")
    src.model.set_attention(dict(kind="tile_window", tile=[1, 4, 4], window=[3, 3, 3], block=16, head_windows=None))
    save_bundle(tmp_path / "sparse", src.model, pipeline=src.pipeline)
    for name in ("text_encoder",):
        import shutil

        shutil.copytree(f"flgengine/assets/shapes-4step/{name}", tmp_path / "sparse" / name)
    out = subprocess.run([sys.executable, "-m", "flgengine", "info", str(tmp_path / "sparse"), "--json"],
                         capture_output=True, text=True, check=True).stdout
    att = json.loads(out)["attention"]
    assert att["kind"] == "tile_window" and att["window"] == [3, 3, 3] and 0 < att["density"] < 1
    dense = json.loads(subprocess.run([sys.executable, "-m", "flgengine", "info", "shapes-4step", "--json"],
                                      capture_output=True, text=True, check=True).stdout)["attention"]
    assert dense == {"kind": "dense", "density": 1.0}


def test_a_pattern_that_does_not_fit_the_default_size_is_refused_at_load(tmp_path):
    import shutil

    import flgengine
    from flgengine.bundle import BundleError

    src = load_bundle("flgengine/assets/shapes-4step")
    src.model.set_attention(dict(kind="tile_window", tile=[1, 8, 4], window=[3, 1, 1], block=16, head_windows=None))
    save_bundle(tmp_path / "b", src.model, pipeline=src.pipeline)
    shutil.copytree("flgengine/assets/shapes-4step/text_encoder", tmp_path / "b" / "text_encoder")
    with pytest.raises(BundleError, match=r"config.json: attention.tile=\[1, 8, 4\] is larger than the token grid "
                                          r"\[9, 4, 4\].*default size 9 x 32 x 32"):
        flgengine.load(tmp_path / "b")
