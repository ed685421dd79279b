"""Configs (strict json round trip) and bundles: save/load and every validation error."""

import dataclasses
import json
import re
import struct

import pytest
import torch
from safetensors.torch import save_file

from flgengine.bundle import BundleError, load_bundle, save_bundle
from flgengine.config import ConfigError, ModelConfig, PipelineConfig, SamplerConfig
from flgengine.model import DiT
from helpers import tiny_config


def test_configs_round_trip_through_json(tmp_path):
    c = tiny_config(block_ids=[0, 2, 3], block_num_heads=[2, 1, 2], block_ffn_dim=[24, 16, 8])
    c.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == c
    p = PipelineConfig(sampler=SamplerConfig(kind="fewstep", num_steps=4, sigmas=[1.0, 0.9, 0.8, 0.6], guidance=0.0),
                       distilled=True, num_frames=9, height=32, width=32)
    p.to_json(tmp_path / "p.json")
    assert PipelineConfig.from_json(tmp_path / "p.json") == p


def test_model_config_of_an_older_bundle_loads_with_later_features_off():
    d = tiny_config().to_dict()
    d.pop("format_version")  # an older writer's file: no format_version
    for key in ("pos_grid", "pooled_text", "velocity_skip", "attention", "image_dim", "family"):  # added later
        d.pop(key)
    c = ModelConfig.from_dict(d, "old config.json")
    assert c == tiny_config() and not c.pooled_text and c.velocity_skip is None and c.pos_grid is None
    assert c.image_dim is None
    # format_version 2 named the keys of version 2, not those added in 3
    v2 = {k: v for k, v in tiny_config().to_dict().items() if k not in ("image_dim", "family")}
    assert ModelConfig.from_dict({**v2, "format_version": 2}, "v2 config.json") == dataclasses.replace(
        tiny_config(), format_version=2)
    with pytest.raises(ConfigError, match="missing key 'attention'"):
        ModelConfig.from_dict({**{k: v for k, v in v2.items() if k != "attention"}, "format_version": 2}, "config.json")
    with pytest.raises(ConfigError, match="missing key 'image_dim'"):
        ModelConfig.from_dict({**v2, "format_version": 3}, "config.json")  # format_version 3 names it
    v3 = {k: v for k, v in tiny_config().to_dict().items() if k != "family"}
    assert ModelConfig.from_dict({**v3, "format_version": 3}, "v3 config.json").family == "wan"  # family came in 4
    with pytest.raises(ConfigError, match="missing key 'family'"):
        ModelConfig.from_dict(v3, "config.json")
    p = {k: v for k, v in PipelineConfig().to_dict().items() if k not in ("image", "image_encoder")}
    assert PipelineConfig.from_dict({**p, "format_version": 2}, "pipeline.json").image == "none"


def test_a_config_this_version_writes_must_name_every_key_with_its_type():
    d = tiny_config().to_dict()
    assert d["format_version"] == 5
    for key in ("velocity_skip", "pooled_text", "attention", "image_dim", "family"):  # keys that change the model's function
        with pytest.raises(ConfigError, match=f"missing key '{key}'"):
            ModelConfig.from_dict({k: v for k, v in d.items() if k != key}, "config.json")
    for key, value, expected in (("pooled_text", "xxxxx", "true or false"), ("num_heads", 2.0, "an integer"),
                                 ("velocity_skip", float("nan"), "a finite number or null"),
                                 ("patch_size", [1, 2], "a list of 3"), ("block_ids", [0, True], "a list"),
                                 ("format_version", 6, "an integer in 1..5")):
        with pytest.raises(ConfigError, match=f"config.json: .*{key}.*{value!r}.*expected {expected}"
                           if key != "format_version" else "format_version = 6: expected an integer in 1..5"):
            ModelConfig.from_dict({**d, key: value}, "config.json")
    p = PipelineConfig().to_dict()
    with pytest.raises(ConfigError, match="key 'negative_prompt' = 1000000000000: expected a string"):
        PipelineConfig.from_dict({**p, "negative_prompt": 1000000000000}, "pipeline.json")
    with pytest.raises(ConfigError, match="key 'distilled' = 1: expected true or false"):
        PipelineConfig.from_dict({**p, "distilled": 1}, "pipeline.json")


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(bogus=1), "unknown key 'bogus'"),
    (lambda d: d.pop("head_dim"), "missing key 'head_dim'"),
    (lambda d: d.update(head_dim=7), "head_dim must be even"),
    (lambda d: d.update(block_ids=[0, 9]), "block_ids"),
    (lambda d: d.update(block_ids=[0, 1], block_num_heads=[1]), "block_num_heads"),
])
def test_model_config_rejects_bad_keys_and_values(edit, match):
    d = tiny_config().to_dict()
    edit(d)
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(d, "config.json")


def test_nested_pipeline_config_names_the_bad_key():
    d = PipelineConfig().to_dict()
    d["sampler"]["sigmaz"] = [1.0]
    with pytest.raises(ConfigError, match="sampler.*unknown key 'sigmaz'"):
        PipelineConfig.from_dict(d, "pipeline.json")


@pytest.fixture
def bundle(tmp_path):
    model = DiT(tiny_config(block_ids=[0, 1, 3]))
    return save_bundle(tmp_path / "b", model, provenance={"teacher": "test"}), model


def test_bundle_round_trip(bundle):
    path, model = bundle
    b = load_bundle(path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "pipeline.json", "provenance.json"]
    assert b.model.config == model.config and b.provenance["teacher"] == "test"
    assert len(b.provenance["weights_sha256"]) == 64
    for k, v in model.state_dict().items():
        assert torch.equal(b.model.state_dict()[k], v), k
    x, t, c = torch.randn(1, 4, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 3, 12)
    with torch.no_grad():
        assert torch.allclose(b.model(x, t, c), model.eval()(x, t, c), rtol=0, atol=1e-5)


def test_provenance_is_typed(bundle):
    path, _ = bundle
    good = json.loads((path / "provenance.json").read_text())
    for key, value, expected in (("weights_sha256", "abc", "a sha256 hex digest"), ("num_params", 3.5, "an integer >= 0"),
                                 ("num_params", True, "an integer >= 0"), ("storage_dtype", "int3", "one of float32"),
                                 ("stages", [1], "a list of objects"), ("created", 5, "a string"),
                                 ("teacher", 5, "a string or an object"), ("evaluation", [], "an object")):
        (path / "provenance.json").write_text(json.dumps({**good, key: value}))
        with pytest.raises(BundleError, match=f"provenance.json: {key} must be {expected}.*got {re.escape(repr(value))}"):
            load_bundle(path)
    (path / "provenance.json").write_text(json.dumps({**good, "evaluation": {"fd": float("nan")}}))
    with pytest.raises(BundleError, match="provenance.json: evaluation.fd is nan; numbers must be finite"):
        load_bundle(path)
    (path / "provenance.json").write_text(json.dumps({**good, "my_tool": {"anything": [1, "x"]}}))
    assert load_bundle(path).provenance["my_tool"] == {"anything": [1, "x"]}  # other keys: any JSON


def test_bundle_stored_in_fp16_loads_in_fp32(tmp_path):
    model = DiT(tiny_config())
    full = save_bundle(tmp_path / "fp32", model)
    half = save_bundle(tmp_path / "fp16", model, storage_dtype=torch.float16)
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(half) < 0.6 * size(full)
    b = load_bundle(half)
    assert b.provenance["storage_dtype"] == "float16" and b.model.config.dtype == "float32"
    for k, v in model.state_dict().items():
        got = b.model.state_dict()[k]
        assert got.dtype == torch.float32 and torch.equal(got, v.half().float()), k


def test_bundle_stored_in_int8_is_within_half_a_step_of_each_row(tmp_path):
    torch.manual_seed(0)
    model = DiT(tiny_config())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    full = save_bundle(tmp_path / "fp32", model)
    q = save_bundle(tmp_path / "int8", model, storage_dtype=torch.int8)
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(q) < 0.55 * size(full)  # rows of 16 here: a 4-byte scale per 16 bytes (0.26x at width 192)
    b = load_bundle(q)
    assert b.provenance["storage_dtype"] == "int8"
    for k, v in model.state_dict().items():
        got = b.model.state_dict()[k]
        assert got.dtype == torch.float32, k
        if v.dim() >= 2:  # int8 rows: |w - q * scale| <= scale / 2, scale = max|row| / 127
            step = v.abs().amax(dim=-1, keepdim=True) / 127
            assert ((got - v).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all(), k
            assert not torch.equal(got, v), k
        else:  # vectors in float16
            assert torch.equal(got, v.half().float()), k
    # scales that do not fit their tensor are named
    def drop_rows(sd):
        key = next(k for k in sd if k.endswith(".int8_scale"))
        sd[key] = sd[key][:1]
    _rewrite_weights(q, drop_rows)
    with pytest.raises(BundleError, match="int8 scales"):
        load_bundle(q)


def _rewrite_weights(path, fn):
    from safetensors.torch import load_file

    sd = load_file(str(path / "model.safetensors"))
    fn(sd)
    save_file(sd, str(path / "model.safetensors"))


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "pipeline.json", "provenance.json"])
def test_missing_file_is_named(bundle, name):
    path, _ = bundle
    (path / name).unlink()
    with pytest.raises(BundleError, match=f"{name}: missing"):
        load_bundle(path)


def test_missing_bundle_dir(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(extra=3), "config.json: unknown key 'extra'"),
    (lambda d: d.pop("ffn_dim"), "config.json: missing key 'ffn_dim'"),
])
def test_bad_config_keys(bundle, edit, match):
    path, _ = bundle
    d = json.loads((path / "config.json").read_text())
    edit(d)
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match=match):
        load_bundle(path)


def test_unknown_pipeline_key(bundle):
    path, _ = bundle
    d = json.loads((path / "pipeline.json").read_text())
    d["codec"]["zoom"] = 2
    (path / "pipeline.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match="pipeline.json: codec: unknown key 'zoom'"):
        load_bundle(path)


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("blocks.1.ffn.fc1.weight"), "missing tensor 'blocks.1.ffn.fc1.weight'"),
    (lambda sd: sd.update({"blocks.9.x": torch.zeros(1)}), "unexpected tensor 'blocks.9.x'"),
    (lambda sd: sd.update({"head.proj.bias": torch.zeros(5)}), r"'head.proj.bias' has shape \(5,\)"),
    (lambda sd: sd["time_proj.weight"].__setitem__((0, 0), float("nan")), "'time_proj.weight' contains NaN"),
    (lambda sd: sd["blocks.0.modulation"].__setitem__((1, 1), float("inf")), "'blocks.0.modulation' contains NaN or Inf"),
])
def test_bad_tensors_are_named(bundle, edit, match):
    path, _ = bundle
    _rewrite_weights(path, edit)
    with pytest.raises(BundleError, match=match):
        load_bundle(path)


def test_truncated_weights(bundle):
    path, _ = bundle
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(BundleError, match="model.safetensors: truncated"):
        load_bundle(path)
    (path / "model.safetensors").write_bytes(data[:20])
    with pytest.raises(BundleError, match="model.safetensors: truncated or not a safetensors file"):
        load_bundle(path)


def test_not_safetensors(bundle):
    path, _ = bundle
    (path / "model.safetensors").write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 50)
    with pytest.raises(BundleError, match="not a safetensors file"):
        load_bundle(path)


def test_pickle_is_refused_without_unpickling(bundle):
    path, model = bundle
    torch.save(model.state_dict(), path / "model.safetensors")  # a zip-pickle under the right name
    with pytest.raises(BundleError, match="pickle"):
        load_bundle(path)
    import pickle

    (path / "model.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(BundleError, match="pickle"):
        load_bundle(path)
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "model.bin")
    with pytest.raises(BundleError, match="model.safetensors: missing; found pickle file 'model.bin'"):
        load_bundle(path)


def test_safetensors_whose_header_length_looks_like_a_pickle_opcode_loads(bundle):
    # a header length with low byte 0x80 must not be mistaken for a pickle (regression)
    path, model = bundle
    sd = model.state_dict()
    for pad in range(0, 600, 8):
        save_file(sd, str(path / "model.safetensors"), metadata={"pad": "x" * pad})
        if (path / "model.safetensors").read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("could not craft the header length")
    assert load_bundle(path).model.config == model.config
