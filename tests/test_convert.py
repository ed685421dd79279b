"""flgengine.convert picks a model family by the diffusers class name, or by the keys of a
bare state dict, and refuses what no family converts."""

import json

import pytest
import torch

from flgengine.bundle import BundleError
from flgengine.config import ModelConfig
from flgengine.convert import FAMILIES, bundle_from_diffusers, from_diffusers, to_diffusers, wan
from flgengine.model import DiT

TINY = ModelConfig(in_channels=4, out_channels=4, num_heads=2, head_dim=16, ffn_dim=32, text_dim=16, freq_dim=16,
                   num_layers=2)


def test_wan_is_a_family():
    assert FAMILIES["WanTransformer3DModel"] is wan


def test_round_trip_through_a_diffusers_directory(tmp_path):
    torch.manual_seed(0)
    dit = DiT(TINY)
    out = to_diffusers(dit, tmp_path / "transformer")
    assert json.loads((out / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
    config, state = from_diffusers(out)
    assert config.to_dict() == TINY.to_dict()
    assert state.keys() == dit.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in dit.state_dict().items())
    # a bare state dict: the family by its keys, the heads given
    from safetensors.torch import load_file

    config2, state2 = from_diffusers(load_file(out / "diffusion_pytorch_model.safetensors"), num_heads=2)
    assert config2.to_dict() == TINY.to_dict() and state2.keys() == state.keys()


def test_unknown_families_are_refused(tmp_path):
    out = to_diffusers(DiT(TINY), tmp_path / "transformer")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "_class_name": "SomeOtherTransformer"}))
    with pytest.raises(ValueError, match="SomeOtherTransformer"):
        from_diffusers(out)
    with pytest.raises(ValueError, match="no supported diffusers transformer"):
        from_diffusers({"x.weight": torch.zeros(2, 2)})
    (tmp_path / "pipe").mkdir()
    with pytest.raises(BundleError, match="names its class"):
        bundle_from_diffusers(tmp_path / "pipe", tmp_path / "bundle")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(BundleError, match="transformer: missing"):
        bundle_from_diffusers(tmp_path / "pipe", tmp_path / "bundle")
