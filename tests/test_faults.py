"""Faults while writing: SIGKILL at random points of save_bundle and of
`python -m flgengine.export`, a full disk (a file size limit: RLIMIT_FSIZE) during a bundle or
checkpoint save, and two processes exporting into one directory. A directory that loads must be
one whole version, never a mix or a partial one; a failed write leaves the previous version.
(Killed distill runs resume: test_trainer.py.)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flgengine.bundle import BundleError, file_sha256, load_bundle, save_bundle
from flgengine.config import PipelineConfig
from flgengine.model import DiT
from helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}

# a child that saves two versions of one bundle, A and B, in turn, forever; each version's
# pipeline.json (num_frames), provenance (marker) and weights (seed) belong together
SAVER = """
import sys, torch
from flgengine.bundle import save_bundle
from flgengine.config import PipelineConfig
from flgengine.model import DiT
from helpers import tiny_config
path = sys.argv[1]
models = []
for seed, frames in ((1, 5), (2, 9)):
    torch.manual_seed(seed)
    models.append((DiT(tiny_config(num_layers=6, ffn_dim=512)), PipelineConfig(num_frames=frames), "AB"[seed - 1]))
print("ready", flush=True)
i = 0
while True:
    model, pipeline, marker = models[i % 2]
    save_bundle(path, model, pipeline, {"marker": marker})
    i += 1
"""


def _check_whole(path: Path) -> str | None:
    """The version ("A" / "B") of the bundle at `path`, None if there is none; fails on a mix."""
    if not path.exists():
        return None
    b = load_bundle(path)
    marker = b.provenance["marker"]
    assert b.pipeline.num_frames == {"A": 5, "B": 9}[marker], f"pipeline.json of another version than {marker}"
    assert b.provenance["weights_sha256"] == file_sha256(path / "model.safetensors"), "weights of another version"
    return marker


def test_sigkill_during_save_bundle_leaves_one_whole_version(tmp_path):
    path = tmp_path / "bundle"
    rng = random.Random(0)
    seen = set()
    for _ in range(6):  # per-file atomic writes (no staging) mix versions in about 1 kill of 3
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], env=ENV, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen.add(_check_whole(path))
    assert seen & {"A", "B"}, "no save finished before the kills: the test killed too early to say anything"
    visible = [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert visible == ["bundle"]  # only hidden partial directories / the lock file beside it


def _limited(code: str, limit: int, *args: str) -> subprocess.CompletedProcess:
    """Runs `code` in a child whose files may not grow past `limit` bytes (the write fails with
    EFBIG, as a full disk fails with ENOSPC)."""
    pre = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n")
    return subprocess.run([sys.executable, "-c", pre + code, *args], env=ENV, capture_output=True, text=True,
                          timeout=120)


def test_a_full_disk_during_save_bundle_keeps_the_previous_bundle(tmp_path):
    path = tmp_path / "bundle"
    torch.manual_seed(0)
    small = DiT(tiny_config())
    save_bundle(path, small, PipelineConfig(num_frames=5), {"marker": "A"})
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    code = """
import sys, torch
from flgengine.bundle import BundleError, save_bundle
from flgengine.config import PipelineConfig
from flgengine.model import DiT
from helpers import tiny_config
try:
    save_bundle(sys.argv[1], DiT(tiny_config(num_layers=6, ffn_dim=512)), PipelineConfig(num_frames=9), {"marker": "B"})
except BundleError as e:
    print("BundleError:", e)
"""
    size = (path / "model.safetensors").stat().st_size
    r = _limited(code, size + 4096, str(path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "BundleError:" in r.stdout and "writing the bundle failed (File too large)" in r.stdout, r.stdout
    assert "the previous bundle is unchanged" in r.stdout
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert _check_whole(path) == "A"
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name], "the failed save left its partial directory"


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_checkpoint(tmp_path):
    from distill.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, {"step": 3, "w": torch.ones(10)})
    code = """
import sys, torch
from distill.checkpoint import save_checkpoint
try:
    save_checkpoint(sys.argv[1], {"step": 4, "w": torch.zeros(1_000_000)})
except OSError as e:
    print("OSError:", e)
"""
    r = _limited(code, 100_000, str(path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "failed (File too large); the previous checkpoint is unchanged" in r.stdout, r.stdout
    state = load_checkpoint(path)
    assert state["step"] == 3 and torch.equal(state["w"], torch.ones(10))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_save_bundle_keeps_the_parts_its_pipeline_names_and_refuses_other_things(tmp_path):
    from flgengine.config import TextEncoderConfig

    path = tmp_path / "b"
    (path / "text_encoder").mkdir(parents=True)  # a part written before the DiT, as users assemble bundles
    (path / "text_encoder" / "weights").write_bytes(b"part")
    pipeline = PipelineConfig(text_encoder=TextEncoderConfig(kind="tokens", path="text_encoder"))
    save_bundle(path, DiT(tiny_config()), pipeline)
    save_bundle(path, DiT(tiny_config()), pipeline)  # again, over the bundle: the part stays
    assert (path / "text_encoder" / "weights").read_bytes() == b"part"
    assert sorted(p.name for p in path.iterdir()) == sorted(["text_encoder", "config.json", "model.safetensors",
                                                             "pipeline.json", "provenance.json"])
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="holds '.*', which is neither a bundle file nor a part"):
        save_bundle(tmp_path, DiT(tiny_config()))
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ---- engines ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def student(tmp_path_factory):
    pytest.importorskip("onnxruntime")  # the export extra (installed by make setup)
    pytest.importorskip("onnxscript")
    from tiny_wan import make_tiny_wan_bundle

    return make_tiny_wan_bundle(tmp_path_factory.mktemp("student"), student=True)


def _export(student: Path, out: Path, seed: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flgengine.export", str(student), "--format", "onnx", "-o", str(out),
                             "--seed", str(seed)], env=ENV, stderr=subprocess.PIPE, text=True)


def test_sigkill_during_export_keeps_the_previous_engine(student, tmp_path):
    from flgengine.export import export_engine, load_engine

    out = tmp_path / "engine"
    first = export_engine(student, "onnx", out, seed=1, progress=False)
    proc = _export(student, out, seed=2)
    lines = []
    for line in proc.stderr:  # kill while it writes its engine files
        lines.append(line)
        if line.startswith("[2/"):
            time.sleep(random.Random(0).uniform(0.2, 1.5))
            break
    assert proc.poll() is None, "".join(lines)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    engine = load_engine(out)  # checks every file against engine.json's sha256
    assert engine.manifest.created == first.created and engine.manifest.verification.seed == 1


def test_two_exports_into_one_directory_never_mix(student, tmp_path):
    from flgengine.export import load_engine

    out = tmp_path / "engine"
    procs = [_export(student, out, seed) for seed in (1, 2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    engine = load_engine(out)  # one export's files, each with the hash its engine.json pins
    assert engine.manifest.verification.seed in (1, 2)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["engine.json", *engine.manifest.files])
    manifest = json.loads((out / "engine.json").read_text())
    assert all(file_sha256(out / n) == h for n, h in manifest["sha256"].items())
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]
