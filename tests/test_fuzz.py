"""Seeded mutation loops over what flgengine reads: the shipped student's bundle, an ONNX engine
of it, distill run configs and training shards. Every mutant must either load and work (finite
frames / batches, a well-typed config), or fail with the project's own errors (BundleError,
EngineError, ConfigError, or a ValueError naming the bad input) — never another exception, a
crash, a hang (a watchdog ends the run after HANG_S seconds on one mutant) or NaN output.

Mutations: JSON values (deleted, unknown keys added, replaced by values of other types, NaN,
huge numbers); safetensors truncated, its header corrupted or declared huge, replaced by a
pickle, a tensor set to NaN / Inf, reshaped, retyped; engine files changed, truncated or
replaced by a symlink. `make test` runs a bounded slice (~30 s); a longer run is one command:

    FLG_FUZZ_MUTANTS=2000 .venv/bin/python -m pytest tests/test_fuzz.py -q

(FLG_FUZZ_MUTANTS counts bundle mutants; engines get a quarter as many, run configs and shards
one each per bundle mutant.)
"""

from __future__ import annotations

import faulthandler
import json
import os
import pickle
import random
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import flgengine
from flgengine.bundle import BundleError
from flgengine.config import ConfigError

MUTANTS = int(os.environ.get("FLG_FUZZ_MUTANTS", "120"))
HANG_S = 60.0  # one mutant taking longer is a hang: the watchdog dumps every thread's stack and exits
ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def watchdog(what: str):
    """Ends the test process with every thread's traceback if the block takes HANG_S seconds."""
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
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


def _mutate_weights(path: Path, rng: random.Random, kinds: int = 6) -> str:
    raw = path.read_bytes()
    kind = rng.randrange(kinds)
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
    v = state[key].clone()
    if kind in (4, 5):
        v.view(-1)[rng.randrange(v.numel())] = float("nan") if kind == 4 else float("inf")
        what = f"{key} gets a {'NaN' if kind == 4 else 'Inf'}"
    elif kind == 6:
        v = v.reshape(-1)[: max(1, v.numel() // 2)].clone()
        what = f"{key} reshaped to {tuple(v.shape)}"
    elif kind == 7:
        v = v.to(torch.int32)
        what = f"{key} as int32"
    else:
        state["extra"] = torch.zeros(3)
        what = "an extra tensor"
    state[key] = v
    save_file(state, path)
    return what


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
        with watchdog(what):
            problem = _check_mutant(bundle)
        if problem is not None:
            problems.append(f"mutant {i} ({what}): {problem}")
        loaded += problem is None
    assert not problems, "\n".join(problems[:20])
    assert loaded == MUTANTS


# ---- engines ------------------------------------------------------------------------------------

def _mutate_file(path: Path, rng: random.Random) -> str:
    raw = path.read_bytes()
    kind = rng.randrange(4)
    if kind == 0:
        cut = rng.randrange(len(raw))
        path.write_bytes(raw[:cut])
        return f"{path.name} truncated to {cut} bytes"
    if kind == 1:
        i = rng.randrange(len(raw))
        path.write_bytes(raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:])
        return f"{path.name} byte {i} flipped"
    if kind == 2:
        path.write_bytes(os.urandom(64))
        return f"{path.name} replaced by garbage"
    other = path.parent.parent / "elsewhere"
    other.write_bytes(raw)
    path.unlink()
    path.symlink_to(other)
    return f"{path.name} a symlink out of the engine directory"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    pytest.importorskip("onnxruntime")  # the export extra (installed by make setup)
    pytest.importorskip("onnxscript")
    from flgengine.export import export_engine

    out = tmp_path_factory.mktemp("engine") / "clean"
    export_engine("shapes-4step", "onnx", out, progress=False)
    return out


def test_mutated_engines_load_right_or_fail_with_our_errors(engine, tmp_path):
    rng = random.Random(99)
    problems, outcomes = [], {"loaded": 0, "refused": 0}
    for i in range(max(20, MUTANTS // 4)):
        work = tmp_path / "work"
        if work.exists():
            shutil.rmtree(work)
        mutant = work / "engine"
        shutil.copytree(engine, mutant)
        if rng.random() < 0.6:
            data = json.loads((mutant / "engine.json").read_text())
            what = "engine.json: " + _mutate_json(data, rng)
            (mutant / "engine.json").write_text(json.dumps(data))
        else:
            what = _mutate_file(mutant / rng.choice(["dit.onnx", "dit.onnx.data"]), rng)
        with watchdog(what):
            try:
                pipe = flgengine.load("shapes-4step", engine=mutant)
                video = pipe("a red circle moving left", seed=0, progress=False)
                if video.dtype != torch.uint8:
                    problems.append(f"mutant {i} ({what}): a {video.dtype} video")
                outcomes["loaded"] += 1
            except (BundleError, ConfigError, ValueError):  # EngineError is a ValueError
                outcomes["refused"] += 1
            except Exception as e:
                problems.append(f"mutant {i} ({what}): {type(e).__name__}: {str(e)[:200]}")
    assert not problems, "\n".join(problems[:20])
    print(outcomes)
    assert outcomes["loaded"] and outcomes["refused"], outcomes  # both kinds of mutant were made


# ---- distill run configs ------------------------------------------------------------------------

def _json_type(v):
    return "int" if type(v) is int else "number" if type(v) in (int, float) else type(v).__name__


def test_mutated_run_configs_load_well_typed_or_fail_with_config_errors(tmp_path):
    import yaml

    from distill.run import RunConfig

    clean = yaml.safe_load((ROOT / "configs" / "shapes-4step.yaml").read_text())
    defaults = {"data": RunConfig.DATA["world"], "importance": RunConfig.IMPORTANCE, "plan": RunConfig.PLAN,
                "evaluate": RunConfig.EVALUATE, "convert": RunConfig.CONVERT}
    rng = random.Random(7)
    problems = []
    for i in range(MUTANTS):
        data = json.loads(json.dumps(clean))
        what = _mutate_json(data, rng)
        if rng.random() < 0.3:
            what += "; " + _mutate_json(data, rng)
        (tmp_path / "run.json").write_text(json.dumps(data))
        try:
            cfg = RunConfig.load(tmp_path / "run.json")
        except ConfigError:
            continue
        except Exception as e:
            problems.append(f"mutant {i} ({what}): {type(e).__name__}: {str(e)[:200]}")
            continue
        # loaded: every section value has its default's JSON type (None: a string or null)
        for name, d in defaults.items():
            section = getattr(cfg, name)
            if section is None:  # evaluate: null
                continue
            for key, default in d.items():
                v = section[key]
                ok = (v is None or isinstance(v, str)) if default is None else \
                    (_json_type(v) in ("int", "number")) if isinstance(default, float) else \
                    (_json_type(v) == _json_type(default))
                if not ok:
                    problems.append(f"mutant {i} ({what}): loaded with {name}.{key} = {v!r}")
    assert not problems, "\n".join(problems[:20])


# ---- training shards ----------------------------------------------------------------------------

@pytest.mark.parametrize("image", ["none", "concat"])
def test_mutated_shards_load_finite_or_fail_with_bundle_errors(image, tmp_path):
    """Shards of a text-to-video teacher, and of a Wan2.1-I2V one (+ image latents, CLIP tokens)."""
    from safetensors.torch import save_file

    from distill.data import ShardData

    clean = tmp_path / "clean"
    clean.mkdir()
    g = torch.Generator().manual_seed(0)
    for n in range(2):
        shard = {"latents": torch.randn(3, 4, 2, 4, 4, generator=g), "context": torch.randn(3, 5, 8, generator=g),
                 "uncond": torch.zeros(1, 5, 8)}
        if image == "concat":
            shard |= {"image_latents": torch.randn(3, 4, 2, 4, 4, generator=g),
                      "image_context": torch.randn(3, 3, 6, generator=g)}
        save_file(shard, clean / f"shard-{n}.safetensors")
    rng = random.Random(5)
    problems = []
    for i in range(MUTANTS):
        mutant = tmp_path / "mutant"
        if mutant.exists():
            shutil.rmtree(mutant)
        shutil.copytree(clean, mutant)
        what = _mutate_weights(mutant / f"shard-{rng.randrange(2)}.safetensors", rng, kinds=9)
        with watchdog(what):
            try:
                data = ShardData(mutant, image=image, patch=(1, 2, 2), temporal_factor=4)
                x0, ctx = data.batch(0, 4)
                if not (torch.isfinite(x0).all() and torch.isfinite(ctx).all() and torch.isfinite(data.uncond).all()):
                    problems.append(f"mutant {i} ({what}): non-finite batch")
                cond = data.condition(x0, 0)
                if image == "concat" and not (cond.latents.shape == (4, 8, 2, 4, 4) and cond.image_context.shape[0] == 4
                                              and torch.isfinite(cond.latents).all()):
                    problems.append(f"mutant {i} ({what}): condition {tuple(cond.latents.shape)}")
                if data.uncond.shape != (1, *ctx.shape[1:]):
                    problems.append(f"mutant {i} ({what}): uncond {tuple(data.uncond.shape)}")
            except BundleError:
                pass
            except Exception as e:
                problems.append(f"mutant {i} ({what}): {type(e).__name__}: {str(e)[:200]}")
    assert not problems, "\n".join(problems[:20])
