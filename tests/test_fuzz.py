"""A seeded mutation loop over the shipped student's bundle: every mutant must either load and
generate finite frames, or fail with the project's own errors (BundleError, ConfigError, or a
ValueError naming the bad input) — never another exception, a crash or NaN output.

Mutations: JSON values of config.json, pipeline.json, provenance.json and the text encoder's
config.json (deleted, unknown keys added, replaced by values of other types, NaN, huge numbers);
model.safetensors truncated, its header corrupted or declared huge, replaced by a pickle, or a
weight set to NaN / Inf. `make test` runs a bounded slice; a longer run is one command:

    FLG_FUZZ_MUTANTS=2000 .venv/bin/python -m pytest tests/test_fuzz.py -q
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch

import flgengine
from flgengine.bundle import BundleError
from flgengine.config import ConfigError

MUTANTS = int(os.environ.get("FLG_FUZZ_MUTANTS", "120"))
JSON_FILES = ("config.json", "pipeline.json", "provenance.json", "text_encoder/config.json")
ODD_VALUES = ("xxxxx", 1000000000000, -1, 0, None, True, False, [], {}, [1, 2], 1.5, float("nan"), float("inf"), "")


def _paths(obj, prefix=()):
    """Every key path of a JSON object (nested objects too)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))


def _mutate_json(data: dict, rng: random.Random) -> str:
    paths = list(_paths(data))
    path = rng.choice(paths)
    parent = data
    for k in path[:-1]:
        parent = parent[k]
    action = rng.random()
    if action < 0.25:
        del parent[path[-1]]
        return f"delete {'.'.join(path)}"
    if action < 0.35:
        parent["unknown_" + str(rng.randrange(100))] = 1
        return f"unknown key beside {'.'.join(path)}"
    value = rng.choice(ODD_VALUES)
    parent[path[-1]] = value
    return f"{'.'.join(path)} = {value!r}"


def _mutate_weights(path: Path, rng: random.Random) -> str:
    raw = path.read_bytes()
    kind = rng.randrange(6)
    if kind == 0:
        cut = rng.randrange(len(raw))
        path.write_bytes(raw[:cut])
        return f"truncated to {cut} bytes"
    if kind == 1:
        (n,) = struct.unpack("<Q", raw[:8])
        i = 8 + rng.randrange(n)
        path.write_bytes(raw[:i] + bytes([rng.randrange(256)]) + raw[i + 1:])
        return f"header byte {i} changed"
    if kind == 2:
        path.write_bytes(struct.pack("<Q", 2**40) + raw[8:])
        return "header length 2**40"
    if kind == 3:
        path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
        return "a pickle"
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    key = rng.choice(sorted(k for k, v in state.items() if v.is_floating_point()))
    state[key] = state[key].clone()
    state[key].view(-1)[rng.randrange(state[key].numel())] = float("nan") if kind == 4 else float("inf")
    save_file(state, path)
    return f"{key} gets a {'NaN' if kind == 4 else 'Inf'}"


def _check_mutant(bundle: Path) -> str | None:
    """None if the mutant behaves (loads and generates finite frames, or fails with our errors)."""
    try:
        pipe = flgengine.load(bundle, device="cpu")
        video = pipe("a red circle moving left", seed=0, progress=False)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 3, 9, 32, 32, generator=g)
        v = pipe.dit(x, torch.tensor([500.0]), pipe.text_encoder.encode(["a red circle moving left"]))
    except (BundleError, ConfigError, ValueError):
        return None
    except Exception as e:  # any other exception type is a defect
        return f"{type(e).__name__}: {str(e)[:200]}"
    if video.dtype != torch.uint8 or not torch.isfinite(v).all():
        return "loaded and generated non-finite output"
    return None


def test_mutated_bundles_load_right_or_fail_with_our_errors(tmp_path):
    src = Path(flgengine.__file__).parent / "assets" / "shapes-4step"
    clean = tmp_path / "clean"
    shutil.copytree(src, clean)
    rng = random.Random(1234)
    problems, loaded = [], 0
    for i in range(MUTANTS):
        bundle = tmp_path / "mutant"
        if bundle.exists():
            shutil.rmtree(bundle)
        shutil.copytree(clean, bundle)
        if rng.random() < 0.6:
            name = rng.choice(JSON_FILES)
            data = json.loads((bundle / name).read_text())
            what = f"{name}: " + _mutate_json(data, rng)
            (bundle / name).write_text(json.dumps(data))  # NaN / Infinity as JSON writes them
        else:
            what = "model.safetensors: " + _mutate_weights(bundle / "model.safetensors", rng)
        problem = _check_mutant(bundle)
        if problem is not None:
            problems.append(f"mutant {i} ({what}): {problem}")
        loaded += problem is None
    assert not problems, "\n".join(problems[:20])
    assert loaded == MUTANTS
