"""Engines: ONNX (onnxruntime) and AOTInductor exports of a tiny Wan student, engine.json,
engine-backed generation, and the TensorRT pieces that need no TensorRT. (CUDA graphs and
engines on CUDA: test_cudagraph.py.)

One ONNX export and one AOTInductor compile per test module (module fixtures): AOTI compiles
take about a minute on 2 cores.
"""

import importlib.util
import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("diffusers")

import flgengine  # noqa: E402
from flgengine.bundle import file_sha256  # noqa: E402
from flgengine.export import EngineError, VerificationError, export_engine, load_engine, read_manifest  # noqa: E402
from flgengine.export.__main__ import main as export_cli  # noqa: E402
from flgengine.export.manifest import EngineManifest  # noqa: E402
from flgengine.export.spec import EngineSpec  # noqa: E402
from flgengine.model import DiT  # noqa: E402
from tiny_wan import make_tiny_wan_bundle  # noqa: E402
from helpers import assert_close, rel_err, tiny_config  # noqa: E402

LATENT = (4, 3, 8, 8)  # the tiny student's default video: 9 frames of 64x64 -> (C, F, H, W)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return make_tiny_wan_bundle(tmp_path_factory.mktemp("student"), student=True)


@pytest.fixture(scope="module")
def onnx_dir(student, tmp_path_factory):
    """Built through the CLI, as users do."""
    out = tmp_path_factory.mktemp("engines") / "onnx"
    assert export_cli([str(student), "--format", "onnx", "-o", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def aoti_dir(student, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "aoti"
    export_engine(student, "aoti", out, max_batch=2, progress=False)
    return out


@pytest.fixture(scope="module")
def dit(student):
    from flgengine.bundle import load_bundle

    model = load_bundle(student).model
    model.backend = "ref"
    return model


def _inputs(batch, text_len, seed=7, latent=LATENT, text_dim=32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, *latent, generator=g), torch.rand(batch, generator=g) * 1000,
            torch.randn(batch, text_len, text_dim, generator=g))


# ---- tracing helpers -----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 5, 2, 8), (2, 97, 3, 6)])
def test_real_arithmetic_rope_equals_the_complex_rotation(shape):
    from flgengine.ops import ref

    x = torch.randn(shape)
    ang = torch.randn(shape[1], shape[3] // 2)
    xc = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    want = torch.view_as_real(xc * torch.polar(torch.ones_like(ang).double(), ang.double())[None, :, None, :]).flatten(-2)
    assert_close(ref.apply_rope(x, ang.cos(), ang.sin()), want, 1e-6, "real-arithmetic rope fp32 vs complex fp64")
    strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous
    assert not strided.is_contiguous()
    assert_close(ref.apply_rope(strided, ang.cos(), ang.sin()), want, 1e-6, "non-contiguous input")


@pytest.mark.parametrize("dynamic", [("batch",), ("batch", "text_len")])
def test_exported_program_keeps_every_tensor_on_the_inputs_device(dynamic):
    """A CPU tensor inside the graph of a CUDA export would make the engine copy from the
    host on every call (and keep a CUDA graph from capturing it). Traced on the meta device,
    which stands in for any accelerator here: every value and constant must stay there."""
    from flgengine.export.tracing import export_program

    with torch.device("meta"):
        model = DiT(tiny_config(in_channels=3, out_channels=3, block_ids=[0, 1, 3])).eval()
    spec = EngineSpec.from_options(model, (8, 16, 16), batch=1, max_batch=2, text_len=6, dynamic=dynamic,
                                   dtype="float32")
    program = export_program(model, spec, torch.device("meta"))
    elsewhere = [(node.name, str(node.target)) for node in program.graph.nodes
                 for v in (node.meta.get("val") if isinstance(node.meta.get("val"), (list, tuple)) else [node.meta.get("val")])
                 if isinstance(v, torch.Tensor) and v.device.type != "meta"]
    assert elsewhere == []
    assert program.constants and all(c.device.type == "meta" for c in program.constants.values())  # the RoPE tables


def test_export_leaves_the_model_usable(onnx_dir, dit):
    """Tracing must not leave fake tensors in the RoPE cache, nor change the model's backend."""
    from flgengine.model.embed import clear_rope_cache

    x, t, c = _inputs(1, 24)
    after_export = dit(x, t, c)
    clear_rope_cache()
    fresh = dit(x, t, c)
    assert type(after_export) is torch.Tensor and torch.equal(after_export, fresh)
    assert dit.backend == "ref"


# ---- ONNX -----------------------------------------------------------------------------------

def test_onnx_engine_manifest(onnx_dir, student):
    m = read_manifest(onnx_dir)
    assert m.format == "onnx" and m.files == ("dit.onnx", "dit.onnx.data") and m.dtype == "float32"
    assert [(s.name, s.shape) for s in m.inputs] == [("x", ("batch", *LATENT)), ("t", ("batch",)),
                                                     ("context", ("batch", "text_len", 32))]
    assert m.outputs[0].shape == ("batch", *LATENT)
    assert (m.dynamic_dims["batch"].min, m.dynamic_dims["batch"].max) == (1, 4)
    assert (m.dynamic_dims["text_len"].opt, m.dynamic_dims["text_len"].max) == (24, 24)  # umT5 max_length
    assert m.video == {"num_frames": 9, "height": 64, "width": 64}
    assert m.bundle.weights_sha256 == file_sha256(student / "model.safetensors")
    assert m.sha256 == {f: file_sha256(onnx_dir / f) for f in m.files}
    assert m.options["opset"] == 23 and {"torch", "onnx", "onnxruntime"} <= set(m.versions)
    v = m.verification
    assert v is not None and v.rel_error <= 1e-5 and v.tolerance == 1e-5 and len(v.shapes) == 2
    # a strict round trip
    assert EngineManifest.from_dict(json.loads((onnx_dir / "engine.json").read_text())) == m


def test_onnx_graph_has_native_rmsnorm_and_attention(onnx_dir):
    import onnx

    model = onnx.load(str(onnx_dir / "dit.onnx"), load_external_data=False)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 23
    ops = {n.op_type for n in model.graph.node}
    assert {"RMSNormalization", "Attention", "LayerNormalization"} <= ops
    big = [i for i in model.graph.initializer if len(i.dims) >= 2 and i.dims[0] * i.dims[1] >= 1024]  # weight matrices
    assert len(big) >= 10 and all(i.data_location == onnx.TensorProto.EXTERNAL for i in big)


@pytest.mark.parametrize("batch,text_len", [(1, 24), (3, 5)])
def test_onnx_engine_matches_pytorch_on_fresh_inputs(onnx_dir, dit, batch, text_len):
    engine = load_engine(onnx_dir)
    x, t, c = _inputs(batch, text_len, seed=batch)
    want = dit(x, t, c)
    got = engine(x, t, c)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5


def test_engine_checks_inputs_before_running(onnx_dir):
    engine = load_engine(onnx_dir)
    engine.runner = lambda *a: pytest.fail("the engine ran on inputs it was not built for")
    x, t, c = _inputs(2, 24)
    with pytest.raises(EngineError, match=r"must be \(batch, 4, 3, 8, 8\).*9 frames 64x64"):
        engine(torch.randn(2, 4, 5, 8, 8), t, c)
    with pytest.raises(EngineError, match="batch 5 is outside the engine's range 1..4"):
        engine(*_inputs(5, 24))
    with pytest.raises(EngineError, match="text_len 30 is outside"):
        engine(x, t, torch.randn(2, 30, 32))
    with pytest.raises(EngineError, match="batch is 1 here but 2"):
        engine(x, t[:1], c)
    with pytest.raises(EngineError, match="must be float32"):
        engine(x.double(), t, c)


def test_manifest_reading_is_strict(onnx_dir, tmp_path):
    data = json.loads((onnx_dir / "engine.json").read_text())

    def write(d):
        (tmp_path / "engine.json").write_text(json.dumps(d))
        for f in ("dit.onnx", "dit.onnx.data"):
            (tmp_path / f).write_bytes(b"")
        return tmp_path

    with pytest.raises(EngineError, match="unknown key 'extra'"):
        read_manifest(write({**data, "extra": 1}))
    with pytest.raises(EngineError, match="missing key 'bundle'"):
        read_manifest(write({k: v for k, v in data.items() if k != "bundle"}))
    bad = json.loads(json.dumps(data))
    bad["inputs"][0]["shape"][0] = "frames"
    with pytest.raises(EngineError, match="names dim 'frames', which dynamic_dims does not define"):
        read_manifest(write(bad))
    bad = json.loads(json.dumps(data))
    bad["dynamic_dims"]["batch"] = {"min": 4, "opt": 1, "max": 8}
    with pytest.raises(EngineError, match="1 <= min <= opt <= max"):
        read_manifest(write(bad))
    assert read_manifest(write(data)).format == "onnx"
    (tmp_path / "dit.onnx.data").unlink()
    with pytest.raises(EngineError, match="dit.onnx.data: missing"):
        read_manifest(tmp_path)
    (tmp_path / "engine.json").unlink()
    with pytest.raises(EngineError, match="not an engine directory"):
        read_manifest(tmp_path)
    old = {**{k: v for k, v in data.items() if k != "sha256"}, "manifest_version": 1}  # before file hashes
    with pytest.raises(EngineError, match="manifest_version 1 is not supported .* export the engine again"):
        read_manifest(write(old))
    for files, sha, match in ((["../dit.onnx"], {"../dit.onnx": "0" * 64}, "names inside the engine directory"),
                              (data["files"], {**data["sha256"], "dit.onnx": "xyz"}, "'dit.onnx' has 'xyz'"),
                              (data["files"], {**data["sha256"], "other": "0" * 64}, "names \\['other'\\]")):
        with pytest.raises(EngineError, match=match):
            read_manifest(write({**data, "files": files, "sha256": sha}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without CUDA")
def test_a_cuda_engine_on_a_machine_without_cuda_is_one_clear_error(onnx_dir, tmp_path):
    import shutil

    copy = tmp_path / "engine"
    shutil.copytree(onnx_dir, copy)
    data = json.loads((copy / "engine.json").read_text())
    (copy / "engine.json").write_text(json.dumps({**data, "device": "cuda"}))
    with pytest.raises(EngineError, match="a CUDA engine, and this machine has no CUDA device"):
        load_engine(copy)


def test_an_engine_file_changed_after_export_is_refused_before_it_is_opened(onnx_dir, tmp_path, monkeypatch):
    import shutil

    from flgengine.export import formats

    copy = tmp_path / "engine"
    shutil.copytree(onnx_dir, copy)
    raw = bytearray((copy / "dit.onnx.data").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one weight byte: the graph would load and compute something else
    (copy / "dit.onnx.data").write_bytes(bytes(raw))
    opened = []
    monkeypatch.setattr(formats.BUILDERS["onnx"], "open", lambda *a: opened.append(a))
    with pytest.raises(EngineError, match="dit.onnx.data: sha256 .* differs .* changed after export; refusing to load"):
        load_engine(copy)
    assert not opened


# ---- AOTInductor ----------------------------------------------------------------------------

def test_aoti_engine_loads_back_and_matches_pytorch(aoti_dir, dit, student):
    m = read_manifest(aoti_dir)
    assert m.format == "aoti" and m.files == ("dit.pt2",) and m.device == "cpu"
    assert m.dynamic_dims["batch"].max == 2 and m.verification.rel_error <= 1e-5
    engine = load_engine(aoti_dir)
    assert engine.runner.metadata()["weights_sha256"] == file_sha256(student / "model.safetensors")
    for batch, text_len in ((1, 24), (2, 3)):
        x, t, c = _inputs(batch, text_len, seed=10 + batch)
        assert rel_err(engine(x, t, c), dit(x, t, c)) <= 1e-5


def test_aoti_probe_load_turns_a_crashing_or_hanging_loader_into_an_error(aoti_dir, monkeypatch):
    from flgengine.export import aoti

    aoti.probe_load(aoti_dir / "dit.pt2")  # a package that loads: no error
    runner = aoti.AotiRunner(aoti_dir / "dit.pt2", "cpu", probe=True)
    assert runner.metadata()["flgengine_dtype"] == "float32"
    # the loader of a child process killed by SIGSEGV (what torch 2.11's CUDA loader did), or stuck
    monkeypatch.setattr(aoti, "_PROBE_CODE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(aoti.AotiLoadError, match="crashed \\(SIGSEGV\\)"):
        aoti.AotiRunner(aoti_dir / "dit.pt2", "cpu", probe=True)
    monkeypatch.setattr(aoti, "_PROBE_CODE", "import time; time.sleep(30)")
    with pytest.raises(aoti.AotiLoadError, match="did not finish in 1 s"):
        aoti.probe_load(aoti_dir / "dit.pt2", timeout=1.0)
    monkeypatch.setattr(aoti, "_PROBE_CODE", "raise SystemExit(3)")
    with pytest.raises(aoti.AotiLoadError, match="exit 3"):
        aoti.probe_load(aoti_dir / "dit.pt2")


def test_aoti_engine_refuses_other_shapes_with_an_error_not_a_crash(aoti_dir):
    """The package itself would read out of bounds; the engine checks first."""
    engine = load_engine(aoti_dir)
    _, t, c = _inputs(1, 24)
    for x, match in ((torch.randn(1, 4, 3, 16, 8), r"built for latents \(4, 3, 8, 8\)"),
                     (torch.randn(1, 3, 3, 8, 8), "must be"),
                     (torch.randn(3, 4, 3, 8, 8), "batch 3 is outside the engine's range 1..2")):
        tt, cc = (t, c) if x.shape[0] == 1 else (t.expand(3), c.expand(3, -1, -1))
        with pytest.raises(EngineError, match=match):
            engine(x, tt, cc)
    assert engine(*_inputs(1, 24)).shape == (1, *LATENT)  # and still runs after refusing


# ---- engine-backed generation --------------------------------------------------------------

@pytest.mark.parametrize("which", ["onnx", "aoti"])
def test_generate_through_an_engine_gives_the_pytorch_video(student, request, which):
    engine = request.getfixturevalue(f"{which}_dir")
    want = flgengine.generate("a red cat runs", model=student, seed=3, progress=False, backend="ref")
    pipe = flgengine.load(student, engine=engine)
    assert pipe.engine is not None and pipe.engine.manifest.format == which
    calls = []
    run = pipe.engine.runner
    pipe.engine.runner = lambda *a: calls.append(a[0].shape[0]) or run(*a)
    got = pipe("a red cat runs", seed=3, progress=False)
    assert calls == [1, 1, 1, 1]  # the DiT ran through the engine, 4 steps
    assert got.shape == want.shape and (got.int() - want.int()).abs().max() <= 1


def test_engine_from_other_weights_or_config_is_refused(student, onnx_dir, tmp_path):
    other = make_tiny_wan_bundle(tmp_path / "other", student=True, seed=1)  # same shapes, other weights
    with pytest.raises(EngineError, match="built from other weights than bundle"):
        flgengine.load(other, engine=onnx_dir)
    teacher = make_tiny_wan_bundle(tmp_path / "teacher")  # 4 blocks, not the student's 3
    with pytest.raises(EngineError, match="another config.*block_ids"):
        flgengine.load(teacher, engine=onnx_dir)
    with pytest.raises(EngineError, match="not an engine directory"):
        flgengine.load(student, engine=tmp_path)


def test_engine_refuses_other_sizes_and_settings_before_compute(student, onnx_dir):
    pipe = flgengine.load(student, engine=onnx_dir)
    pipe.engine.runner = lambda *a: pytest.fail("the engine ran")
    with pytest.raises(ValueError, match="built for 9 frames of 64x64; 5 frames of 64x64"):
        pipe("a dog", num_frames=5, progress=False)
    with pytest.raises(ValueError, match="DiT batch of 1..4, this request needs 5"):
        pipe(["a dog"] * 5, progress=False)
    with pytest.raises(ValueError, match="takes float32, not torch.bfloat16"):
        flgengine.load(student, engine=onnx_dir, dtype="bf16")
    with pytest.raises(ValueError, match="brings its own kernels"):
        flgengine.load(student, engine=onnx_dir, backend="ref")


def test_cli_generate_with_engine(student, onnx_dir, tmp_path):
    from flgengine.__main__ import main as cli

    out = tmp_path / "e.gif"
    assert cli(["generate", "a dog", "--model", str(student), "--engine", str(onnx_dir), "-o", str(out), "--quiet"]) == 0
    assert out.stat().st_size > 0
    assert cli(["generate", "a dog", "--model", str(student), "--engine", str(onnx_dir), "--frames", "5", "--quiet"]) == 2


# ---- export options and failures (no export runs) ---------------------------------------------

def test_export_cli_errors_are_one_line(student, tmp_path, capsys):
    assert export_cli([str(student), "--format", "onnx", "-o", str(tmp_path / "e"), "--dynamic", "batch,frames"]) == 2
    assert "frames, height and width are fixed per engine" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert export_cli([str(student), "--format", "onnx", "-o", str(tmp_path / "busy")]) == 2
    assert "is not an engine directory (it has no engine.json); refusing to replace it" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert export_cli([str(student), "--format", "onnx", "-o", str(tmp_path / "e"), "--dtype", "bf16"]) == 2
    assert "--format tensorrt --dtype bf16" in capsys.readouterr().err


def test_verification_fails_past_the_tolerance():
    from flgengine.export.verify import verify_engine

    model = DiT(tiny_config()).eval()
    spec = EngineSpec.from_options(model, (3, 8, 8), text_len=5)
    exact = verify_engine(lambda *a: model(*a), model, spec, "cpu")
    assert exact.rel_error == 0.0 and exact.shapes == [{"batch": 1, "text_len": 5}, {"batch": 2, "text_len": 1}]
    with pytest.raises(VerificationError, match="relative error .* > tolerance 1.0e-05"):
        verify_engine(lambda *a: model(*a) * (1 + 1e-4), model, spec, "cpu")


# ---- TensorRT (without TensorRT) -------------------------------------------------------------

def test_tensorrt_profile_from_the_options():
    cfg = DiT(tiny_config())
    spec = EngineSpec.from_options(cfg, (3, 8, 8), batch=2, max_batch=6, text_len=16, min_text_len=4)
    assert spec.profiles() == {
        "x": ((1, 4, 3, 8, 8), (2, 4, 3, 8, 8), (6, 4, 3, 8, 8)),
        "t": ((1,), (2,), (6,)),
        "context": ((1, 4, 12), (2, 16, 12), (6, 16, 12)),
    }
    static = EngineSpec.from_options(cfg, (3, 8, 8), batch=2, text_len=16, dynamic=())
    assert all(lo == opt == hi for lo, opt, hi in static.profiles().values())
    assert static.profiles()["context"][1] == (2, 16, 12)
    assert EngineSpec.from_options(cfg, (3, 8, 8), batch=3, text_len=8).batch.max == 6  # CFG doubles a batch
    with pytest.raises(ValueError, match="need batch to be dynamic"):
        EngineSpec.from_options(cfg, (3, 8, 8), max_batch=4, dynamic=("text_len",))
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        EngineSpec.from_options(cfg, (3, 7, 8))


def test_max_autotune_reaches_the_aoti_compiler_and_nothing_else(student, tmp_path, monkeypatch):
    import torch._inductor as inductor

    seen = {}

    class Stop(Exception):
        pass

    def compile_spy(program, package_path, inductor_configs=None):
        seen.update(inductor_configs or {})
        raise Stop

    monkeypatch.setattr(inductor, "aoti_compile_and_package", compile_spy)
    with pytest.raises(Stop):
        export_engine(student, "aoti", tmp_path / "a", max_autotune=True, progress=False)
    assert seen["max_autotune"] is True and seen["max_autotune_gemm_backends"] == "ATEN,CPP"
    assert "weights_sha256" in seen["aot_inductor.metadata"]
    with pytest.raises(ValueError, match="max_autotune is an AOTInductor option"):
        export_engine(student, "onnx", tmp_path / "o", max_autotune=True, progress=False)


def test_an_fp8_engine_holds_e4m3_weights_and_gives_the_fp8_video(student, onnx_dir, tmp_path):
    """`--precision fp8`: the ONNX graph stores the block linears in e4m3 and rounds their inputs
    to e4m3 per token (onnxruntime runs the numerics the CPU emulates); the manifest says fp8;
    an engine and a precision that differ are one error naming both."""
    import onnx

    out = tmp_path / "fp8"
    assert export_cli([str(student), "--format", "onnx", "--precision", "fp8", "-o", str(out), "--quiet"]) == 0
    manifest = read_manifest(out)
    assert manifest.precision == "fp8" and read_manifest(onnx_dir).precision == "bf16"
    assert manifest.verification.rel_error < 1e-4  # the engine computes what the PyTorch FP8 DiT computes
    graph = onnx.load(str(out / "dit.onnx"), load_external_data=False).graph
    e4m3 = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    assert len(e4m3) == 10 * 3  # the 10 block linears of each of the 3 blocks (FP8_LINEARS)
    casts = [n for n in graph.node if n.op_type == "Cast"
             and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT8E4M3FN for a in n.attribute)]
    assert casts  # activations rounded to e4m3 in the graph
    data = (out / "dit.onnx.data").stat().st_size  # the weights (the graph itself is dit.onnx)
    assert data < 0.6 * (onnx_dir / "dit.onnx.data").stat().st_size  # e4m3 block linears instead of fp32

    want = flgengine.generate("a red cat runs", model=student, seed=3, progress=False, backend="ref", precision="fp8")
    pipe = flgengine.load(student, engine=out)
    assert pipe.precision == "fp8"
    got = pipe("a red cat runs", seed=3, progress=False)
    assert (got.int() - want.int()).abs().max() <= 1
    dense = flgengine.generate("a red cat runs", model=student, seed=3, progress=False, backend="ref")
    assert (dense.int() - want.int()).abs().max() > 1  # FP8 is another function: the check above can tell
    with pytest.raises(ValueError, match=r"precision='bf16': engine .*fp8 was built in fp8"):
        flgengine.load(student, engine=out, precision="bf16")
    with pytest.raises(ValueError, match=r"precision='fp8': engine .*onnx was built in bf16.*--precision fp8"):
        flgengine.load(student, engine=onnx_dir, precision="fp8")
    for fmt, device in (("tensorrt", None), ("aoti", "cuda")):
        with pytest.raises(ValueError, match=f"built in FP8 for the CPU .*not {fmt} on cuda"):
            export_engine(student, fmt, tmp_path / fmt, precision="fp8", device=device, progress=False)
    # a manifest from before `precision` reads as a bf16 engine; this version's must name it
    data = json.loads((onnx_dir / "engine.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    for f in data["files"]:
        (old / f).write_bytes(b"")
    (old / "engine.json").write_text(json.dumps({**{k: v for k, v in data.items() if k != "precision"},
                                                 "manifest_version": 2}))
    assert read_manifest(old).precision == "bf16"
    (old / "engine.json").write_text(json.dumps({k: v for k, v in data.items() if k != "precision"}))
    with pytest.raises(EngineError, match="missing key 'precision'"):
        read_manifest(old)


def test_tensorrt_builder_flags():
    from flgengine.export.tensorrt import builder_flags

    assert builder_flags("float32") == [] and builder_flags("bfloat16") == ["BF16"] and builder_flags("float16") == ["FP16"]
    with pytest.raises(ValueError, match="precision"):
        builder_flags("int8")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_missing_says_how_to_install(student, tmp_path, capsys):
    assert export_cli([str(student), "--format", "tensorrt", "-o", str(tmp_path / "trt")]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "pip install" in err
    assert not (tmp_path / "trt").exists()


def test_the_onnx_tensorrt_consumes(tmp_path):
    """Opset 20 (decomposed RMSNorm / attention), dims named like the profile, same numbers."""
    import onnx

    from flgengine.export.onnx import OnnxRunner, check_onnx_spec, export_onnx, onnx_input_dims
    from flgengine.export.tensorrt import TENSORRT_OPSET

    model = DiT(tiny_config()).eval()
    spec = EngineSpec.from_options(model, (3, 8, 8), text_len=6, max_batch=3)
    files = export_onnx(model, spec, "cpu", tmp_path, TENSORRT_OPSET)
    path = tmp_path / files[0]
    check_onnx_spec(path, spec)
    assert onnx_input_dims(path) == {"x": ["batch", 4, 3, 8, 8], "t": ["batch"], "context": ["batch", "text_len", 12]}
    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    assert not ops & {"RMSNormalization", "Attention"} and "Softmax" in ops
    runner = OnnxRunner(path)
    lo, _, hi = spec.profiles()["context"]
    for b, n, _ in (lo, hi):  # the profile's extremes
        x, t, c = _inputs(b, n, latent=(4, 3, 8, 8), text_dim=12)
        with torch.no_grad():
            assert rel_err(runner(x, t, c), model(x, t, c)) <= 1e-5
