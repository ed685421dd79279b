"""Our HunyuanVideoDiT computes diffusers' HunyuanVideoTransformer3DModel: conversions both
ways, to fp32 rounding, on random tiny models (odd heads, head dims, frames, sizes, text
lengths and masks; with and without the guidance embedding; the image-to-video transformers,
"token_replace" and "latent_concat")."""

import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import HunyuanVideoTransformer3DModel  # noqa: E402

from flgengine.convert import hunyuan as hy  # noqa: E402
from flgengine.model.hunyuan import HunyuanVideoConfig, HunyuanVideoDiT, pack_text  # noqa: E402
from helpers import assert_close  # noqa: E402

CONFIGS = {
    # odd head count, head dim 12 (rope 4/4/4), guidance-distilled, 2 dual + 3 single blocks
    "h3_d12_guided": dict(in_channels=5, out_channels=5, num_attention_heads=3, attention_head_dim=12, num_layers=2,
                          num_single_layers=3, num_refiner_layers=2, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                          guidance_embeds=True, text_embed_dim=20, pooled_projection_dim=9, rope_axes_dim=(4, 4, 4)),
    # head dim 20 (rope 4/8/8), no guidance input, temporal patch 2, one refiner block, mlp ratio 3
    "h5_d20_pt2": dict(in_channels=4, out_channels=6, num_attention_heads=5, attention_head_dim=20, num_layers=1,
                       num_single_layers=2, num_refiner_layers=1, mlp_ratio=3.0, patch_size=2, patch_size_t=2,
                       guidance_embeds=False, text_embed_dim=16, pooled_projection_dim=7, rope_axes_dim=(4, 8, 8),
                       rope_theta=1000.0),
    # single head, 1x1 spatial patch, single-stream blocks only
    "h1_d16_p1_single": dict(in_channels=3, out_channels=3, num_attention_heads=1, attention_head_dim=16, num_layers=0,
                             num_single_layers=2, num_refiner_layers=1, mlp_ratio=4.0, patch_size=1, patch_size_t=1,
                             guidance_embeds=True, text_embed_dim=8, pooled_projection_dim=5, rope_axes_dim=(8, 4, 4)),
    # image to video: the first latent frame's tokens modulated as at t = 0 (guided: no guidance there)
    "h3_d12_token_replace": dict(in_channels=5, out_channels=5, num_attention_heads=3, attention_head_dim=12,
                                 num_layers=2, num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2,
                                 patch_size_t=1, guidance_embeds=True, text_embed_dim=20, pooled_projection_dim=9,
                                 rope_axes_dim=(4, 4, 4), image_condition_type="token_replace"),
    # image to video: image latents and a mask as input channels (4 + 4 + 1 in, 4 out), temporal patch 2
    "h2_d16_latent_concat": dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                 num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2,
                                 patch_size_t=2, guidance_embeds=False, text_embed_dim=12, pooled_projection_dim=6,
                                 rope_axes_dim=(4, 6, 6), image_condition_type="latent_concat"),
}
INPUTS = {"h3_d12_guided": (3, 6, 10, 7), "h5_d20_pt2": (4, 6, 4, 5), "h1_d16_p1_single": (3, 5, 3, 9),
          "h3_d12_token_replace": (3, 6, 4, 6), "h2_d16_latent_concat": (4, 4, 6, 5)}  # F, H, W, L


def _random_hunyuan(cfg, seed=0):
    torch.manual_seed(seed)
    m = HunyuanVideoTransformer3DModel(**cfg).eval()
    with torch.no_grad():  # every weight off its init (norms at 1, biases at 0)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _inputs(cfg, key, lengths=(7, 3), seed=1):
    F, H, W, L = INPUTS[key]
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = torch.zeros(B, L, dtype=torch.int64)
    for i, n in enumerate(lengths):
        mask[i, :min(n, L)] = 1
    return dict(x=torch.randn(B, cfg["in_channels"], F, H, W, generator=g), t=torch.tensor([3.0, 731.5, 999.0])[:B],
                context=torch.randn(B, L, cfg["text_embed_dim"], generator=g), mask=mask,
                pooled=torch.randn(B, cfg["pooled_projection_dim"], generator=g),
                guidance=torch.tensor([6000.0, 3500.0, 1000.0])[:B] if cfg["guidance_embeds"] else None)


def _theirs(model, i):
    return model(i["x"], i["t"], i["context"], i["mask"], i["pooled"], guidance=i["guidance"], return_dict=False)[0]


def _ours(model, i):
    return model(i["x"], i["t"], i["context"], context_mask=i["mask"], pooled_text=i["pooled"], guidance=i["guidance"])


@pytest.mark.parametrize("key", list(CONFIGS))
def test_from_diffusers_matches_hunyuan_forward(key):
    cfg = CONFIGS[key]
    theirs = _random_hunyuan(cfg)
    config, sd = hy.from_diffusers(dict(theirs.config), theirs.state_dict())
    ours = HunyuanVideoDiT(config).eval()
    ours.load_state_dict(sd)
    for lengths in ((7, 3), (5, 5), (9,)):  # padded prompts of two lengths, one length, one unpadded prompt
        i = _inputs(cfg, key, lengths)
        with torch.no_grad():
            want = _theirs(theirs, i)
            assert_close(_ours(ours, i), want, 1e-5, f"{key} lengths {lengths}")
            packed = pack_text(i["context"], i["mask"], i["pooled"])  # one tensor: the same function
            assert_close(ours(i["x"], i["t"], packed, guidance=i["guidance"]), want, 1e-5, f"{key} packed text")
            ours.text_mask = "attention"  # one masked pass (what engines trace): the same function
            assert_close(_ours(ours, i), want, 1e-5, f"{key} lengths {lengths}, attention mask")
            ours.text_mask = "truncate"
            ours.backend = "ref"
            assert_close(_ours(ours, i), want, 1e-5, f"{key} lengths {lengths}, ref backend")
            ours.backend = None


def test_held_out_config():
    """A configuration picked apart from the others: 7 heads of 8 (rope 2/2/4), 3 refiner blocks."""
    cfg = dict(in_channels=2, out_channels=2, num_attention_heads=7, attention_head_dim=8, num_layers=2,
               num_single_layers=1, num_refiner_layers=3, mlp_ratio=1.5, patch_size=2, patch_size_t=1,
               guidance_embeds=False, text_embed_dim=11, pooled_projection_dim=3, rope_axes_dim=(2, 2, 4))
    INPUTS["held_out"] = (2, 4, 6, 6)
    theirs = _random_hunyuan(cfg, seed=5)
    ours = HunyuanVideoDiT(hy.model_config(dict(theirs.config))).eval()
    ours.load_state_dict(hy.from_diffusers(dict(theirs.config), theirs.state_dict())[1])
    i = _inputs(cfg, "held_out", (6, 1, 4), seed=3)
    with torch.no_grad():
        assert_close(_ours(ours, i), _theirs(theirs, i), 1e-5, "held-out config")


@pytest.mark.parametrize("key,keep,kinds", [("h3_d12_guided", (1, 2, 4), (1, 2)),  # dual 1, single 0 and 2
                                             ("h3_d12_token_replace", (0, 3), (1, 1))])  # dual 0, single 1
def test_a_pruned_student_loads_in_diffusers_with_fewer_blocks_of_each_kind(tmp_path, key, keep, kinds):
    cfg = CONFIGS[key]
    theirs = _random_hunyuan(cfg)
    config, sd = hy.from_diffusers(dict(theirs.config), theirs.state_dict())
    teacher = HunyuanVideoDiT(config).eval()
    teacher.load_state_dict(sd)
    student = HunyuanVideoDiT(dataclasses.replace(config, block_ids=list(keep))).eval()
    kept = dict(enumerate(keep))
    student.load_state_dict({k if not k.startswith("blocks.") else
                             f"blocks.{[s for s, t in kept.items() if t == int(k.split('.')[1])][0]}."
                             + k.split(".", 2)[2]: v for k, v in sd.items()
                             if not k.startswith("blocks.") or int(k.split(".")[1]) in kept.values()})
    out = hy.to_diffusers(student, tmp_path / "student")
    loaded = HunyuanVideoTransformer3DModel.from_pretrained(out).eval()
    assert (loaded.config.num_layers, loaded.config.num_single_layers) == kinds
    assert loaded.config.image_condition_type == cfg.get("image_condition_type")
    i = _inputs(cfg, key)
    with torch.no_grad():
        assert_close(_theirs(loaded, i), _ours(student, i), 1e-5, "pruned student in diffusers")
    # and back: the diffusers student converts to the same model
    config2, sd2 = hy.from_diffusers(dict(loaded.config), loaded.state_dict())
    assert (config2.num_layers, config2.num_single_layers) == kinds
    assert config2.image_condition == config.image_condition
    assert all(torch.equal(sd2[k], v) for k, v in student.state_dict().items())


def test_bad_inputs_are_clear_errors_before_compute():
    config = HunyuanVideoConfig(in_channels=2, out_channels=2, num_heads=2, head_dim=8, num_layers=1,
                                num_single_layers=1, num_refiner_layers=1, text_dim=6, pooled_dim=3,
                                rope_axes=(2, 2, 4))
    m = HunyuanVideoDiT(config)
    x, t, c, pooled = torch.randn(1, 2, 1, 4, 4), torch.tensor([10.0]), torch.randn(1, 5, 6), torch.randn(1, 3)
    g = torch.tensor([5000.0])
    with pytest.raises(ValueError, match="pooled_text must be"):
        m(x, t, c, pooled_text=torch.randn(1, 4), guidance=g)
    with pytest.raises(ValueError, match="real tokens first"):  # packed text whose first row is padding
        m(x, t, torch.cat([torch.zeros(1, 1, 6), c], 1), guidance=g)
    with pytest.raises(ValueError, match="embeds the guidance scale"):
        m(x, t, c, pooled_text=pooled)
    with pytest.raises(ValueError, match="real tokens first"):
        m(x, t, c, context_mask=torch.tensor([[0, 1, 1, 0, 0]]), pooled_text=pooled, guidance=g)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        m(torch.randn(1, 2, 1, 5, 4), t, c, pooled_text=pooled, guidance=g)
    with pytest.raises(ValueError, match="rope_axes must be"):
        dataclasses.replace(config, rope_axes=(2, 2, 2))
    m.set_attention(None)  # dense: accepted
    with pytest.raises(ValueError, match="attention kind 'tile_window': block-sparse attention is built for the Wan"):
        m.set_attention({"kind": "tile_window", "tile": [1, 2, 2], "window": [1, 1, 1]})
    with pytest.raises(ValueError, match="unsupported HunyuanVideo image_condition_type 'frame_swap'"):
        hy.model_config({"image_condition_type": "frame_swap"})
    with pytest.raises(ValueError, match="image_condition must be one of None, 'latent_concat', 'token_replace'"):
        dataclasses.replace(config, image_condition="concat")


def test_the_family_registry_converts_saves_and_loads_hunyuan(tmp_path):
    """flgengine.convert.from_diffusers recognises the family (instance, directory, bare state
    dict); a bundle's config.json names it, and load_bundle builds the HunyuanVideoDiT."""
    from flgengine.bundle import load_bundle, save_bundle
    from flgengine.convert import from_diffusers, to_diffusers
    from flgengine.model import build, model_config_from_json

    cfg = CONFIGS["h5_d20_pt2"]
    theirs = _random_hunyuan(cfg, seed=2)
    theirs.save_pretrained(tmp_path / "hf")
    config, sd = from_diffusers(theirs)
    other = from_diffusers(tmp_path / "hf")
    assert other[0] == config and all(torch.equal(other[1][k], v) for k, v in sd.items())
    with pytest.raises(ValueError, match="RoPE split"):  # a bare state dict names no rope_axes_dim
        from_diffusers(theirs.state_dict(), num_heads=5)
    model = build(config).eval()
    assert isinstance(model, HunyuanVideoDiT)
    model.load_state_dict(sd)
    bundle = save_bundle(tmp_path / "bundle", model, storage_dtype=torch.float16)
    assert model_config_from_json(bundle / "config.json") == config and config.family == "hunyuan_video"
    loaded = load_bundle(bundle).model
    assert isinstance(loaded, HunyuanVideoDiT)
    half = {k: v.half().float() for k, v in sd.items()}
    model.load_state_dict(half)
    i = _inputs(cfg, "h5_d20_pt2")
    with torch.no_grad():
        assert torch.equal(_ours(loaded, i), _ours(model, i))
    assert HunyuanVideoTransformer3DModel.from_pretrained(to_diffusers(bundle, tmp_path / "back")).config.num_layers == 1


def test_bf16_runs_close_to_fp32():
    """cast(bf16) keeps the timestep and guidance MLPs in fp32; the rest runs in bf16."""
    cfg = CONFIGS["h3_d12_guided"]
    theirs = _random_hunyuan(cfg)
    config, sd = hy.from_diffusers(dict(theirs.config), theirs.state_dict())
    ours = HunyuanVideoDiT(config).eval()
    ours.load_state_dict(sd)
    i = _inputs(cfg, "h3_d12_guided")
    with torch.no_grad():
        want = _ours(ours, i)
        ours.cast(torch.bfloat16)
        assert ours.time_embed.fc1.weight.dtype == torch.float32 and ours.blocks[0].mod_x.weight.dtype == torch.bfloat16
        half = {**i, "x": i["x"].bfloat16(), "context": i["context"].bfloat16(), "pooled": i["pooled"].bfloat16()}
        got = _ours(ours, half)
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), want, 3e-2, "bf16 vs fp32")
