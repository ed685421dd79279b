"""LoRA on DiTs: three key formats give the same weights (W + scale * alpha / r * up @ down),
a teacher's LoRA maps onto a pruned student, merged and unmerged agree, zero LoRAs change
nothing, and every mistake is one clear error before anything changes."""

import pickle
import warnings

import pytest
import torch
from safetensors.torch import save_file

import flgengine
from distill.plan import apply_plan, plan_from_drop
from flgengine.bundle import BundleError, load_bundle, save_bundle
from flgengine.model import DiT
from helpers import tiny_config

# (our module, diffusers name, original Wan name) of the layers the test LoRA changes
LAYERS = [("blocks.0.self_attn.q", "blocks.0.attn1.to_q", "blocks.0.self_attn.q"),
          ("blocks.1.cross_attn.k", "blocks.1.attn2.to_k", "blocks.1.cross_attn.k"),
          ("blocks.2.ffn.fc1", "blocks.2.ffn.net.0.proj", "blocks.2.ffn.0"),
          ("blocks.3.self_attn.o", "blocks.3.attn1.to_out.0", "blocks.3.self_attn.o"),
          ("head.proj", "proj_out", "head.head"),
          ("time_proj", "condition_embedder.time_proj", "time_projection.1")]
RANK, ALPHA = 3, 6.0


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    model = DiT(tiny_config(num_layers=4)).eval()
    return save_bundle(tmp_path_factory.mktemp("t") / "teacher", model), model


def _factors(model, zero_up=False, seed=1):
    """{our module: (down (r, in), up (out, r), diff_b (out,))} for LAYERS; zero_up: ups and diff_b zero."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out = {}
    for ours, _, _ in LAYERS:
        w = mods[ours].weight
        up = torch.zeros(w.shape[0], RANK) if zero_up else torch.randn(w.shape[0], RANK, generator=g) * 0.1
        bias = torch.zeros(w.shape[0]) if zero_up else torch.randn(w.shape[0], generator=g) * 0.01
        out[ours] = (torch.randn(RANK, w.shape[1], generator=g) * 0.1, up, bias)
    return out


def _write(path, factors, fmt):
    """A LoRA file of `factors` in one of the three key formats (alpha / rank folded in for diffusers')."""
    sd = {}
    for ours, diffusers_name, wan_name in LAYERS:
        down, up, bias = factors[ours]
        if fmt == "diffusers":
            sd[f"transformer.{diffusers_name}.lora_A.weight"] = down * (ALPHA / RANK)
            sd[f"transformer.{diffusers_name}.lora_B.weight"] = up
            sd[f"transformer.{diffusers_name}.lora_B.bias"] = bias
        else:
            name = f"diffusion_model.{wan_name}" if fmt == "wan" else "lora_unet_" + wan_name.replace(".", "_")
            sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
            sd[f"{name}.alpha"], sd[f"{name}.diff_b"] = torch.tensor(ALPHA), bias
    save_file(sd, path)
    return path


def _expected(model, factors, scale):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for ours, (down, up, bias) in factors.items():
        state[f"{ours}.weight"] += scale * (ALPHA / RANK) * up @ down
        state[f"{ours}.bias"] += scale * bias
    return state


@pytest.mark.parametrize("fmt", ["diffusers", "wan", "kohya"])
def test_every_key_format_merges_to_the_same_weights(fmt, teacher, tmp_path):
    path, model = teacher
    factors = _factors(model)
    lora = _write(tmp_path / f"{fmt}.safetensors", factors, fmt)
    b = load_bundle(path, lora=lora, lora_scale=0.7)
    want = _expected(model, factors, 0.7)
    for k, v in b.model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-6, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert sorted(b.lora.layers) == sorted(o for o, _, _ in LAYERS) and b.lora.unmatched == []


def test_zero_lora_is_bit_identical_and_unmerged_matches_merged(teacher, tmp_path):
    path, model = teacher
    x, t, c = torch.randn(2, 4, 3, 8, 8), torch.tensor([10.0, 900.0]), torch.randn(2, 5, 12)
    with torch.no_grad():
        base = model(x, t, c)
        zero = _write(tmp_path / "zero.safetensors", _factors(model, zero_up=True), "wan")
        lora = _write(tmp_path / "lora.safetensors", _factors(model), "diffusers")
        assert torch.equal(load_bundle(path, lora=zero).model(x, t, c), base)  # W + 0: the same bits
        merged = load_bundle(path, lora=lora, lora_scale=0.5).model(x, t, c)
        unmerged = load_bundle(path, lora=[lora, zero], lora_scale=[0.5, 1.0], lora_mode="unmerged").model
        torch.testing.assert_close(unmerged(x, t, c), merged, rtol=1e-5, atol=1e-5)
        unmerged.set_lora_scale(0.0)
        assert torch.equal(unmerged(x, t, c), base)  # switched off: the base layers alone
        unmerged.set_lora_scale([0.5, 0.0])
        torch.testing.assert_close(unmerged(x, t, c), merged, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged, base)


def test_a_teachers_lora_maps_onto_a_pruned_student(teacher, tmp_path):
    path, model = teacher
    factors = _factors(model)
    lora = _write(tmp_path / "lora.safetensors", factors, "wan")
    merged_teacher = _expected(model, factors, 1.0)
    # the same LoRA on the teacher and on a student keeping every block: the same function
    whole = save_bundle(tmp_path / "whole", apply_plan(model, plan_from_drop(model, [], {b: 0.0 for b in range(4)})))
    x, t, c = torch.randn(1, 4, 3, 8, 8), torch.tensor([300.0]), torch.randn(1, 5, 12)
    with torch.no_grad():
        torch.testing.assert_close(load_bundle(whole, lora=lora).model(x, t, c), load_bundle(path, lora=lora).model(x, t, c),
                                   rtol=0, atol=0)
    # a student without teacher blocks 1 and 2: their deltas go, with the share of the norm they held
    student = apply_plan(model, plan_from_drop(model, [1, 2], {b: 0.0 for b in range(4)}))
    spath = save_bundle(tmp_path / "student", student)
    with pytest.warns(UserWarning, match=r"removed blocks this LoRA changes; their deltas are dropped \((\d+\.\d)% "):
        b = load_bundle(spath, lora=lora)
    norms = {o: ((ALPHA / RANK) * f[1] @ f[0]).norm() ** 2 for o, f in factors.items()}
    dropped = (norms["blocks.1.cross_attn.k"] + norms["blocks.2.ffn.fc1"]) ** 0.5 / sum(norms.values()) ** 0.5
    assert b.lora.dropped_norm[str(lora)] == pytest.approx(dropped.item(), rel=1e-5)
    got = b.model.state_dict()
    for pos, tb in enumerate([0, 3]):  # student block pos holds teacher block tb, merged as the teacher's
        for k, v in merged_teacher.items():
            if k.startswith(f"blocks.{tb}."):
                torch.testing.assert_close(got[f"blocks.{pos}." + k.split(".", 2)[2]], v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["head.proj.weight"], merged_teacher["head.proj.weight"], rtol=1e-6, atol=1e-6)


def test_lora_merged_before_fp8_quantisation(teacher, tmp_path):
    from flgengine.model.precision import fp8_weight_keys, quantize_state

    path, model = teacher
    factors = _factors(model)
    lora = _write(tmp_path / "lora.safetensors", factors, "diffusers")
    got = load_bundle(path, lora=lora, precision="fp8").model.state_dict()
    want = quantize_state(_expected(model, factors, 1.0), fp8_weight_keys(model))  # merge in fp32, then quantise
    assert got["blocks.0.self_attn.q.weight"].dtype == torch.float8_e4m3fn  # a LoRA'd layer, in FP8
    for k in ("blocks.0.self_attn.q.weight", "blocks.0.self_attn.q.weight_scale", "blocks.3.self_attn.o.weight"):
        assert torch.equal(got[k].float(), want[k].float()), k


def test_unmatched_keys_are_reported_and_mistakes_are_clear_errors(teacher, tmp_path):
    path, model = teacher
    sd = {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 16),
          "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(16, 2),
          "transformer.blocks.0.attn1.to_nowhere.lora_A.weight": torch.zeros(2, 16),
          "transformer.blocks.0.attn1.to_nowhere.lora_B.weight": torch.zeros(16, 2),
          "transformer.blocks.9.attn1.to_q.lora_A.weight": torch.zeros(2, 16),
          "transformer.blocks.9.attn1.to_q.lora_B.weight": torch.zeros(16, 2),
          "some_other_key": torch.zeros(1)}
    save_file(sd, tmp_path / "partial.safetensors")
    with pytest.warns(UserWarning, match="5 LoRA keys match no layer of the model and are not applied"):
        b = load_bundle(path, lora=tmp_path / "partial.safetensors")
    assert len(b.lora.unmatched) == 5 and any("to_nowhere" in k for k in b.lora.unmatched)
    # another architecture: the layer is there with another shape
    save_file({"blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 64),
               "blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, 2)}, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="another architecture or size"):
        load_bundle(path, lora=tmp_path / "wide.safetensors")
    save_file({"double_blocks.0.img_attn_qkv.lora_A.weight": torch.zeros(2, 8),
               "double_blocks.0.img_attn_qkv.lora_B.weight": torch.zeros(8, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="no key matches a layer of this wan model"):
        load_bundle(path, lora=tmp_path / "other.safetensors")
    (tmp_path / "lora.pt").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(BundleError, match="a pickle file; flgengine reads LoRAs from safetensors only"):
        flgengine.load(path, lora=tmp_path / "lora.pt", device="cpu")
    with pytest.raises(ValueError, match="lora_scale lists 2 scales for 1 LoRAs"):
        load_bundle(path, lora=tmp_path / "wide.safetensors", lora_scale=[1.0, 2.0])
    with pytest.raises(FileNotFoundError, match="LoRA file not found"):
        load_bundle(path, lora=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="lora_mode='fused' is not one of merge, unmerged"):
        load_bundle(path, lora=tmp_path / "wide.safetensors", lora_mode="fused")


def test_cli_and_generate_take_loras(tmp_path):
    from flgengine.__main__ import main
    from tiny_wan import make_tiny_wan_bundle

    bundle = make_tiny_wan_bundle(tmp_path / "b")
    model = flgengine.load(bundle, device="cpu").dit
    lora = _write(tmp_path / "lora.safetensors", _factors(model), "wan")
    kw = dict(seed=0, steps=2, progress=False)
    want = flgengine.generate("a red cat runs", model=bundle, lora=lora, lora_scale=0.5, **kw)
    assert not torch.equal(want, flgengine.generate("a red cat runs", model=bundle, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of this LoRA matches
        assert main(["generate", "a red cat runs", "--model", str(bundle), "--lora", str(lora), "--lora-scale", "0.5",
                     "--steps", "2", "-o", str(tmp_path / "o.gif"), "--quiet"]) == 0
    with pytest.raises(ValueError, match="an engine .* runs the weights it was built from"):
        flgengine.load(bundle, engine=tmp_path / "engine", lora=lora)


def test_a_hunyuan_lora_in_diffusers_names_maps_across_block_kinds():
    from flgengine.model.hunyuan import HunyuanVideoConfig, HunyuanVideoDiT

    torch.manual_seed(0)
    model = HunyuanVideoDiT(HunyuanVideoConfig(in_channels=4, out_channels=4, num_heads=2, head_dim=8, num_layers=2,
                                               num_single_layers=2, num_refiner_layers=1, text_dim=6, pooled_dim=3,
                                               rope_axes=(2, 2, 4)))
    from flgengine.lora import lora_deltas

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        sd = {"transformer.single_transformer_blocks.1.attn.to_q.lora_A.weight": torch.ones(2, 16),
              "transformer.single_transformer_blocks.1.attn.to_q.lora_B.weight": torch.ones(16, 2),
              "transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight": torch.ones(2, 16),
              "transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight": torch.ones(16, 2)}
        save_file(sd, Path(d) / "h.safetensors")
        deltas = lora_deltas(Path(d) / "h.safetensors", model)
    assert sorted(deltas) == ["blocks.0.attn.add_k", "blocks.3.attn.q"]  # single block 1 = our block 2 + 1
