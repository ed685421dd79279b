"""Weight storage (flgengine/storage.py): int4 groups against a float64 reference, the nibble
layout, what falls back to int8 / fp16, and int4 bundles end to end."""

import pytest
import torch

from flgengine.bundle import BundleError, load_bundle, save_bundle
from flgengine.model import DiT
from flgengine.storage import (INT4_CLIPS, INT4_SCALE, INT8_SCALE, dequantize_stored, quantize_int4, storage_dtype_of,
                               storage_name)
from helpers import tiny_config


def _int4_reference(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantised weights, per-group scale) by the formula, in float64, group by group: of the
    clips c in INT4_CLIPS, the fp16 scale c * max|w| / 7 with the least squared error (the
    first of equal ones)."""
    out = torch.empty_like(w, dtype=torch.float64)
    scales = torch.empty(w.shape[0], w.shape[1] // group, dtype=torch.float64)
    for r in range(w.shape[0]):
        for g in range(w.shape[1] // group):
            x = w[r, g * group:(g + 1) * group].double()
            best = None
            for c in INT4_CLIPS:
                s = float(torch.tensor(float(torch.tensor(x.abs().max().item(), dtype=torch.float32) * c) / 7.0).half())
                q = (x / s).round().clamp(-7, 7) if s > 0 else torch.zeros_like(x)
                err = float(((q * s - x) ** 2).sum())
                if best is None or err < best[0] * (1 - 1e-6):  # float32 in the library: near-ties may go either way
                    best = (err, s, q)
            _, s, q = best
            out[r, g * group:(g + 1) * group] = q * s
            scales[r, g] = s
    return out, scales


def _plain_errors(w: torch.Tensor, group: int) -> torch.Tensor:
    """Per-group squared error (rows, groups) of int4 with the plain max |w| / 7 scale (no clip), float64."""
    x = w.double().reshape(w.shape[0], -1, group)
    s = (x.abs().amax(-1, keepdim=True) / 7.0).half().double()
    q = torch.where(s > 0, (x / s.clamp_min(1e-300)).round().clamp(-7, 7), 0.0)
    return ((q * s - x) ** 2).sum(-1)


@pytest.mark.parametrize("group", [64, 8])
def test_int4_round_trip_equals_the_formula_and_beats_the_plain_max_scale(group):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 64, generator=g) * torch.logspace(-3, 1, 5)[:, None]  # rows of very different scale
    w[2, :group] = 0.0  # an all-zero group
    w[4, 3] = 3.0 * w[4].abs().max()  # an outlier
    key = "blocks.0.ffn.fc1.weight"
    stored = quantize_int4({key: w}, group=group)
    assert stored[key].dtype == torch.uint8 and stored[key].shape == (5, 32)
    scale16 = stored[key + INT4_SCALE]
    assert scale16.dtype == torch.float16 and scale16.shape == (5, 64 // group)
    got = dequantize_stored(dict(stored), "test")[key]
    want, scale = _int4_reference(w, group)
    assert got.dtype == torch.float32
    stored_step = scale16.double().repeat_interleave(group, dim=1)
    q = got.double() / stored_step.clamp_min(1e-300)
    assert torch.equal(q, q.round()) and q.abs().max() <= 7  # every weight is q * its group's stored scale
    # the reference's scale, up to near-ties of the error (float32 in the library, float64 here)
    same = torch.isclose(scale16.double(), scale, rtol=0, atol=0)
    assert same.float().mean() >= 0.9, (scale16, scale)
    assert torch.allclose(got.double()[same.repeat_interleave(group, dim=1)], want[same.repeat_interleave(group, dim=1)])
    err = ((got.double() - w.double()) ** 2).sum().item()
    assert err <= ((want - w.double()) ** 2).sum().item() * (1 + 1e-5)
    assert err <= _plain_errors(w, group).sum().item() * (1 + 1e-5)  # never worse than no clip
    inside = w.double().abs() <= 7 * stored_step
    # inside the clip, half a step (the fp16 rounding of the scale moves the largest value by up to 7 * s * 2^-11)
    assert ((got.double() - w.double()).abs()[inside] <= (stored_step * (0.5 + 7 * 2.0**-11))[inside] + 1e-12).all()
    assert torch.equal(got[2, :group], torch.zeros(group))


def test_int4_clip_lowers_the_error_of_gaussian_weights():
    """On weights like a trained linear's (Gaussian, groups of 64) the least-squares clip lowers
    the error of the plain max |w| / 7 scale by several percent, and never raises any group's."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    got = dequantize_stored(quantize_int4({"blocks.0.ffn.fc2.weight": w}), "test")["blocks.0.ffn.fc2.weight"]
    err = ((got.double() - w.double()) ** 2).reshape(64, -1, 64).sum(-1)  # (rows, groups)
    plain = _plain_errors(w, 64)
    assert (err <= plain * (1 + 1e-5)).all()
    assert err.sum() < 0.95 * plain.sum()


def test_int4_nibble_layout_is_low_then_high():
    w = torch.zeros(1, 64)
    w[0, :4] = torch.tensor([7.0, -7.0, 1.0, 0.0])  # scale 1: q = 7, -7, 1, 0
    stored = quantize_int4({"blocks.3.self_attn.q.weight": w})
    assert stored["blocks.3.self_attn.q.weight" + INT4_SCALE].item() == 1.0
    b = stored["blocks.3.self_attn.q.weight"][0, :2].tolist()
    assert b == [(7 + 8) | ((-7 + 8) << 4), (1 + 8) | ((0 + 8) << 4)] == [31, 137]


def test_int4_keeps_what_it_cannot_group_in_int8_or_fp16():
    t = {"blocks.0.a.weight": torch.randn(4, 24), "blocks.0.b.weight": torch.randn(2, 3, 64),
         "blocks.0.table": torch.randn(3, 64), "head.proj.weight": torch.randn(8, 64), "bias": torch.randn(64),
         "steps": torch.arange(3)}
    stored = quantize_int4(t)
    assert stored["blocks.0.a.weight"].dtype == torch.int8 and "blocks.0.a.weight" + INT8_SCALE in stored  # 24 % 64
    assert stored["blocks.0.b.weight"].dtype == torch.int8  # 3-D
    assert stored["blocks.0.table"].dtype == torch.int8  # not a `.weight`
    assert stored["head.proj.weight"].dtype == torch.int8  # outside the blocks
    assert stored["bias"].dtype == torch.float16 and torch.equal(stored["steps"], t["steps"])
    with pytest.raises(ValueError, match="even number"):
        quantize_int4(t, group=3)


def test_storage_names_round_trip():
    for name in ("float16", "bfloat16", "float32", "int8", "int4", "fp8"):
        assert storage_name(storage_dtype_of(name)) == name


def test_bundle_stored_in_int4_loads_the_formula_and_is_small(tmp_path):
    torch.manual_seed(0)
    model = DiT(tiny_config(num_heads=2, head_dim=64, ffn_dim=128, text_dim=32, freq_dim=32))  # width 128
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    full = save_bundle(tmp_path / "fp32", model)
    q8 = save_bundle(tmp_path / "int8", model, storage_dtype=torch.int8)
    q4 = save_bundle(tmp_path / "int4", model, storage_dtype=torch.int4)
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(q4) < 0.75 * size(q8) < 0.75 * 0.3 * size(full)
    b = load_bundle(q4)
    assert b.provenance["storage_dtype"] == "int4"
    grouped = 0
    for k, v in model.state_dict().items():
        got = b.model.state_dict()[k]
        assert got.dtype == torch.float32, k
        if k.startswith("blocks.") and k.endswith(".weight") and v.dim() == 2:
            assert torch.equal(got.double(), _int4_reference(v, 64)[0]), k
            grouped += 1
        elif v.dim() >= 2:  # outside the blocks: int8 rows
            assert ((got - v).abs() <= v.abs().amax(-1, keepdim=True) / 254 * (1 + 1e-5) + 1e-7).all(), k
    assert grouped >= 10  # every block's linears
    # scales that do not fit their matrix are named
    from safetensors.torch import load_file, save_file

    sd = load_file(str(q4 / "model.safetensors"))
    key = next(k for k in sd if k.endswith(INT4_SCALE))
    sd[key] = sd[key][:1].contiguous()  # scales for one row
    save_file(sd, str(q4 / "model.safetensors"))
    with pytest.raises(BundleError, match="int4 scales"):
        load_bundle(q4)


def test_store_bundle_copies_a_two_expert_bundle_with_its_parts_and_says_so(tmp_path):
    from flgengine.bundle import store_bundle
    from flgengine.pipeline import resolve_model
    from flgengine.storage import quantize_int4

    src = store_bundle(resolve_model("shapes-teacher"), tmp_path / "t8", torch.int8)  # two experts, a text encoder
    out = store_bundle(src, tmp_path / "t4", torch.int4)
    before, after = load_bundle(src, dtype=torch.float32), load_bundle(out, dtype=torch.float32)
    for name in ("high", "low"):
        want = dequantize_stored(quantize_int4(getattr(before.model, name).state_dict()), "want")
        got = getattr(after.model, name).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), name
    assert (out / "text_encoder" / "model.safetensors").read_bytes() == (src / "text_encoder" / "model.safetensors").read_bytes()
    assert after.pipeline == before.pipeline
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(out) < 0.6 * size(src) and size(out / "low_noise") < 0.6 * size(src / "low_noise")
    prov = after.provenance
    stage = prov["stages"][-1]
    assert stage == {"stage": "store", "storage_dtype": "int4", "from_storage_dtype": "int8",
                     "from_weights_sha256": before.provenance["weights_sha256"], "int4_scales": "least-squares clip",
                     "int4_group": 64}
    assert "int4_scales" not in before.provenance["stages"][-1]  # int8: one scale per row, no clip
    assert prov["storage_dtype"] == "int4" and prov["weights_sha256"] != before.provenance["weights_sha256"]
    shipped = load_bundle(resolve_model("shapes-teacher")).provenance
    assert "evaluation" not in before.provenance and before.provenance["evaluation_before_store"] == shipped["evaluation"]
    assert "evaluation" not in prov and prov["evaluation_before_store"] == shipped["evaluation"]
    with pytest.raises(ValueError, match="is the source"):
        store_bundle(out, out, torch.int8)


def test_store_cli(tmp_path, capsys):
    from flgengine.__main__ import main

    assert main(["store", "shapes-4step", str(tmp_path / "s8"), "--dtype", "int8"]) == 0
    assert "MiB" in capsys.readouterr().out
    assert load_bundle(tmp_path / "s8").provenance["storage_dtype"] == "int8"
    with pytest.raises(SystemExit):
        main(["store", "shapes-4step", str(tmp_path / "x"), "--dtype", "int3"])
    # int4 in groups of 32: the scales say so, the provenance records it, the weights are the formula's
    assert main(["store", "shapes-4step", str(tmp_path / "g32"), "--dtype", "int4", "--int4-group", "32"]) == 0
    from flgengine.files import load_safetensors
    from flgengine.pipeline import resolve_model

    state = load_safetensors(tmp_path / "g32" / "model.safetensors", "g32")
    key = "blocks.0.ffn.fc2.weight"
    assert state[key + INT4_SCALE].shape[1] * 32 == 2 * state[key].shape[1]  # (out, in / 32) scales, in / 2 bytes
    assert load_bundle(tmp_path / "g32").provenance["stages"][-1]["int4_group"] == 32
    capsys.readouterr()
    assert main(["info", str(tmp_path / "g32")]) == 0
    assert "weights stored in int4, groups of 32 (were int4)" in capsys.readouterr().out
    w = load_bundle(resolve_model("shapes-4step")).model.state_dict()[key]  # the shipped weights, dequantised
    got = load_bundle(tmp_path / "g32").model.state_dict()[key]
    assert torch.equal(got.double(), _int4_reference(w, 32)[0])
    for bad in (["--dtype", "int8", "--int4-group", "32"], ["--dtype", "int4", "--int4-group", "3"]):
        with pytest.raises(SystemExit, match="int4-group"):
            main(["store", "shapes-4step", str(tmp_path / "bad"), *bad])
