"""The HunyuanVideo path end to end on tiny random HunyuanVideo parts, as the Wan path is
tested: a diffusers pipeline directory -> bundle -> precompute -> importance -> plan -> stage2
-> stage3 -> student bundle -> generate() -> to_diffusers loaded in diffusers."""

import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import HunyuanVideoTransformer3DModel  # noqa: E402

import flgengine  # noqa: E402
from distill.data import shard_data  # noqa: E402
from distill.wan import precompute  # noqa: E402
from flgengine.config import PipelineConfig  # noqa: E402
from flgengine.convert import bundle_from_diffusers, to_diffusers  # noqa: E402
from flgengine.model.hunyuan import HunyuanVideoDiT, pack_text  # noqa: E402
from flgengine.text import HUNYUAN_TEMPLATE  # noqa: E402
from helpers import assert_close, rel_err, tiny_shard_run, write_clips  # noqa: E402
from tiny_hunyuan import make_tiny_hunyuan_pipeline, tiny_crop_start  # noqa: E402

SIZE = dict(num_frames=5, height=16, width=32, steps=4, guidance=6.0, max_length=12)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A guidance-distilled tiny HunyuanVideo teacher bundle (3 dual + 4 single blocks)."""
    d = tmp_path_factory.mktemp("hunyuan")
    src = make_tiny_hunyuan_pipeline(d / "hf", num_layers=3, num_single_layers=4)
    bundle = bundle_from_diffusers(src, d / "teacher", **SIZE)
    p = PipelineConfig.from_json(bundle / "pipeline.json")  # the tiny tokenizer's crop (HunyuanVideo's: 95)
    p = dataclasses.replace(p, text_encoder=dataclasses.replace(p.text_encoder, crop_start=tiny_crop_start(
        src, HUNYUAN_TEMPLATE)))
    p.to_json(bundle / "pipeline.json")
    return bundle


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    # squares drifting right over 24x40 frames, resized to 16x32 by precompute
    return write_clips(tmp_path_factory.mktemp("videos"), ["a red cat runs", "the dog walks near the river"] * 2,
                       6, 24, 40, 8, 3)


def test_precompute_carries_the_text_mask_and_pooled_text(teacher, videos, tmp_path):
    pipe = flgengine.load(teacher)
    precompute(teacher, videos, tmp_path / "shards", progress=False)
    data = shard_data(pipe, tmp_path / "shards")
    assert data.context.shape == (4, 13, 24)  # 12 prompt tokens + the pooled row
    context, extra = pipe.text_encoder.encode_inputs(["a red cat runs"])
    assert torch.equal(data.context[0:1], pack_text(context, extra["context_mask"], extra["pooled_text"]))
    assert data.inputs == {"guidance": 6000.0}  # the embedded guidance, for every DiT call of the stages
    cond = data.condition(*data.batch(0, 3)[:1], 0)
    assert torch.equal(cond.of_batch(3)["guidance"], torch.full((3,), 6000.0))


def test_hunyuan_teacher_to_student_to_diffusers(teacher, videos, tmp_path):
    precompute(teacher, videos, tmp_path / "shards", progress=False)
    result = tiny_shard_run(teacher, tmp_path / "run", tmp_path / "shards", budget=0.15)
    student = flgengine.load(result["bundle"])
    kept = student.dit.config.block_ids
    assert isinstance(student.dit, HunyuanVideoDiT) and student.config.distilled and len(kept) < 7
    assert {0, 2, 3, 6} <= set(kept)  # the first and last block of each kind stay
    assert student.config.sampler.embedded_guidance == 6.0 and student.config.text_encoder.kind == "hunyuan"
    video = flgengine.generate("a red cat runs", model=result["bundle"], seed=0, progress=False)
    assert video.shape == (1, 5, 16, 32, 3)
    # the student loads in diffusers, with fewer blocks of a kind, and computes the same function
    hf = HunyuanVideoTransformer3DModel.from_pretrained(to_diffusers(result["bundle"], tmp_path / "diffusers")).eval()
    assert hf.config.num_layers + hf.config.num_single_layers == len(kept)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 2, 2, 4, generator=g), torch.tensor([500.0, 80.0])
    c, mask = torch.randn(2, 6, 24, generator=g), torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    pooled, guidance = torch.randn(2, 12, generator=g), torch.tensor([6000.0, 6000.0])
    with torch.no_grad():
        want = student.dit(x, t, c, context_mask=mask, pooled_text=pooled, guidance=guidance)
        assert_close(hf(x, t, c, mask, pooled, guidance=guidance, return_dict=False)[0], want, 1e-5, "student in diffusers")


@pytest.mark.parametrize("fmt", ["onnx", "aoti"])
def test_a_pruned_hunyuan_student_exports_as_an_engine(fmt, teacher, tmp_path):
    """ONNX and AOTInductor engines of a pruned student: inputs (x, t, packed text, guidance),
    the text mask traced as attention masking; the engine's video is the PyTorch one."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from distill.plan import apply_plan, plan_from_drop
    from distill.student import write_student
    from flgengine.export import export_engine

    pipe = flgengine.load(teacher)
    plan = plan_from_drop(pipe.dit, [1, 4], {b: 0.0 for b in range(7)})  # a dual and a single block
    student = apply_plan(pipe.dit, plan).eval()
    bundle = write_student(tmp_path / "student", student, pipe, pipe.config, {"kind": "test student"})
    manifest = export_engine(bundle, fmt, tmp_path / fmt, max_batch=2, progress=False)
    assert [s.name for s in manifest.inputs] == ["x", "t", "context", "guidance"]
    assert manifest.input("context").shape == ("batch", "text_len", 24) and manifest.input("guidance").dtype == "float32"
    assert manifest.verification.rel_error <= 1e-5  # random inputs at two shapes, against the PyTorch DiT
    prompts = ["a red cat runs", "the dog walks near the river"]  # two real lengths in one batch
    want = flgengine.load(bundle)(prompts, seed=1, progress=False)
    got = flgengine.load(bundle, engine=tmp_path / fmt)(prompts, seed=1, progress=False)
    assert (got.float() - want.float()).abs().max() <= 1  # fp32 engines: the same video up to uint8 rounding
    if fmt == "onnx":  # the FP8 engine: e4m3 weights of both block kinds; PyTorch's FP8 DiT's velocity
        from flgengine.export import load_engine

        fp8 = export_engine(bundle, fmt, tmp_path / "fp8", max_batch=2, precision="fp8", progress=False)
        assert fp8.precision == "fp8" and fp8.verification.rel_error <= 1e-3  # (e4m3 codes at boundaries may flip)
        dit = flgengine.load(bundle, precision="fp8", backend="ref").dit
        g = torch.Generator().manual_seed(2)
        x, t = torch.randn(2, *fp8.latent_shape, generator=g), torch.tensor([800.0, 300.0])
        L = fp8.dynamic_dims["text_len"].opt
        text, guidance = torch.randn(2, L, 24, generator=g), torch.tensor([6000.0, 6000.0])
        text[1, 3:-1] = 0  # the second prompt has 3 real tokens, then the pooled row
        with torch.no_grad():
            want8, dense = dit(x, t, text, guidance=guidance), flgengine.load(bundle).dit(x, t, text, guidance=guidance)
        got8 = load_engine(tmp_path / "fp8")(x, t, text, guidance)
        assert rel_err(got8, want8) < 1e-3 < rel_err(dense, want8)  # FP8's function, not the bf16 one


def test_info_describes_a_hunyuan_bundle(teacher, capsys):
    import json

    from flgengine.__main__ import main

    assert main(["info", str(teacher), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "hunyuan_video" and info["blocks"].startswith("7 of 7 (3 of 3 dual-stream, 4 of 4 single")
    assert info["attention"] == {"kind": "dense", "density": 1.0} and info["image_condition"] is None
    assert main(["info", str(teacher)]) == 0
    assert "dual-stream" in capsys.readouterr().out


def test_bad_hunyuan_sources_and_bundles_are_one_clear_error(teacher, tmp_path):
    import json
    import shutil

    from flgengine.bundle import BundleError

    # a bundle missing either text encoder: refused at load, naming the directory
    for missing, what in (("text_encoder_2", "CLIP text encoder"), ("text_encoder", "Llama text encoder")):
        broken = tmp_path / f"no_{missing}"
        shutil.copytree(teacher, broken)
        shutil.rmtree(broken / missing)
        with pytest.raises(BundleError, match=f"{what} directory not found: .*{missing}"):
            flgengine.load(broken)
    # a diffusers directory of another family, and HunyuanVideo's image-to-video variant
    other = tmp_path / "other"
    (other / "transformer").mkdir(parents=True)
    (other / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    with pytest.raises(ValueError, match="supported family .*got 'CogVideoXPipeline'"):
        bundle_from_diffusers(other, tmp_path / "b1")
    i2v = tmp_path / "i2v"
    shutil.copytree(teacher.parent / "hf", i2v)
    cfg = json.loads((i2v / "transformer" / "config.json").read_text())
    (i2v / "transformer" / "config.json").write_text(json.dumps({**cfg, "image_condition_type": "latent_concat"}))
    with pytest.raises(ValueError, match="image_condition_type 'latent_concat'.*convert the transformer alone"):
        bundle_from_diffusers(i2v, tmp_path / "b2")
    # block-sparse calibration of a family without sparse patterns
    from distill.__main__ import main as distill_main

    with pytest.raises(SystemExit, match="block-sparse attention is built for the Wan family, not hunyuan_video"):
        distill_main(["calibrate-attention", str(teacher)])
    # an image-to-video DiT in a bundle: its text encoder would have to read the image
    i2v_bundle = tmp_path / "i2v_bundle"
    shutil.copytree(teacher, i2v_bundle)
    cfg = json.loads((i2v_bundle / "config.json").read_text())
    (i2v_bundle / "config.json").write_text(json.dumps({**cfg, "image_condition": "token_replace"}))
    with pytest.raises(BundleError, match="image-to-video transformer \\(image_condition 'token_replace'\\)"):
        flgengine.load(i2v_bundle)
