"""Our DiT computes diffusers' WanTransformer3DModel: conversions both ways, to fp32 rounding."""

import dataclasses
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

from flgengine.bundle import load_bundle, save_bundle  # noqa: E402
from flgengine.convert import from_diffusers, to_diffusers  # noqa: E402
from flgengine.model import DiT  # noqa: E402
from helpers import assert_close  # noqa: E402

CONFIGS = {
    # odd head count, head dim 24 (rope split 8/8/8), odd frames / sizes, cross-attn norm
    "h3_d24": dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=24, in_channels=5, out_channels=5,
                   text_dim=20, freq_dim=32, ffn_dim=50, num_layers=3, cross_attn_norm=True, rope_max_seq_len=64),
    # head dim 40 (non power of two, rope split 16/12/12), no cross-attn norm, temporal patch 2
    "h5_d40_pt2": dict(patch_size=(2, 2, 2), num_attention_heads=5, attention_head_dim=40, in_channels=4,
                       out_channels=6, text_dim=16, freq_dim=16, ffn_dim=72, num_layers=2, cross_attn_norm=False,
                       rope_max_seq_len=32),
    # single head, 1x1 spatial patch, eps differs
    "h1_d16_p1": dict(patch_size=(1, 1, 1), num_attention_heads=1, attention_head_dim=16, in_channels=3,
                      out_channels=3, text_dim=8, freq_dim=8, ffn_dim=20, num_layers=2, eps=1e-5, rope_max_seq_len=16),
}
INPUTS = {"h3_d24": (3, 6, 10, 7), "h5_d40_pt2": (4, 6, 4, 5), "h1_d16_p1": (3, 5, 3, 9)}  # F, H, W, text length


def _random_wan(cfg):
    m = WanTransformer3DModel(**cfg).eval()
    with torch.no_grad():  # move every weight off its init so nothing is trivially zero / one
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _inputs(cfg, key, B=2):
    F, H, W, L = INPUTS[key]
    x = torch.randn(B, cfg["in_channels"], F, H, W)
    t = torch.tensor([3.0, 731.5])[:B]
    return x, t, torch.randn(B, L, cfg["text_dim"])


@pytest.mark.parametrize("key", list(CONFIGS))
def test_from_diffusers_matches_wan_forward(key):
    cfg = CONFIGS[key]
    wan = _random_wan(cfg)
    config, sd = from_diffusers(wan)
    ours = DiT(config).eval()
    ours.load_state_dict(sd)
    x, t, c = _inputs(cfg, key)
    with torch.no_grad():
        assert_close(ours(x, t, c), wan(x, t, c, return_dict=False)[0], 1e-5, key)
        ours.backend = "ref"
        assert_close(ours(x, t, c), wan(x, t, c, return_dict=False)[0], 1e-5, f"{key} ref backend")


def test_per_token_timesteps_match_wan22_ti2v():
    cfg, key = CONFIGS["h3_d24"], "h3_d24"
    wan = _random_wan(cfg)
    config, sd = from_diffusers(wan)
    ours = DiT(config).eval()
    ours.load_state_dict(sd)
    x, _, c = _inputs(cfg, key)
    S = 3 * 3 * 5  # tokens of a (3, 6, 10) latent with patch (1, 2, 2)
    t = torch.rand(2, S) * 1000
    with torch.no_grad():
        assert_close(ours(x, t, c), wan(x, t, c, return_dict=False)[0], 1e-5, "per-token t")


def test_directory_and_state_dict_sources(tmp_path):
    cfg, key = CONFIGS["h5_d40_pt2"], "h5_d40_pt2"
    wan = _random_wan(cfg)
    wan.save_pretrained(tmp_path / "pipe" / "transformer")
    c1, sd1 = from_diffusers(tmp_path / "pipe")  # a whole pipeline folder
    c2, sd2 = from_diffusers(wan.state_dict(), num_heads=5)
    # eps and the RoPE table length are not in the weights' shapes: the rest is
    assert dataclasses.replace(c2, rope_max_seq_len=c1.rope_max_seq_len) == c1
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_to_diffusers_round_trip_of_a_block_pruned_student(tmp_path):
    cfg, key = dict(CONFIGS["h3_d24"], num_layers=4), "h3_d24"
    wan = _random_wan(cfg)
    config, sd = from_diffusers(wan)
    # the student keeps teacher blocks 0, 2, 3 (block 1 dropped)
    config.block_ids = [0, 2, 3]
    student_sd = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            if i == 1:
                continue
            k = f"blocks.{[0, 2, 3].index(i)}." + k.split(".", 2)[2]
        student_sd[k] = v
    student = DiT(config).eval()
    student.load_state_dict(student_sd)
    out_dir = to_diffusers(student, tmp_path / "wan_student")
    assert json.loads((out_dir / "config.json").read_text())["num_layers"] == 3
    loaded = WanTransformer3DModel.from_pretrained(out_dir).eval()
    x, t, c = _inputs(cfg, key)
    with torch.no_grad():
        assert_close(loaded(x, t, c, return_dict=False)[0], student(x, t, c), 1e-5, "student in diffusers")
        # same function as the teacher with block 1 removed from diffusers' own block list
        wan.blocks = torch.nn.ModuleList([wan.blocks[i] for i in (0, 2, 3)])
        assert_close(wan(x, t, c, return_dict=False)[0], student(x, t, c), 1e-5, "teacher minus block 1")
    # and back again through a bundle
    save_bundle(tmp_path / "bundle", student)
    again = to_diffusers(tmp_path / "bundle", tmp_path / "again")
    c2, sd2 = from_diffusers(again)
    assert c2.num_layers == 3 and all(torch.equal(sd2[k], v) for k, v in student.state_dict().items())


def test_width_pruned_student_is_refused_by_to_diffusers(tmp_path):
    config, _ = from_diffusers(_random_wan(CONFIGS["h3_d24"]))
    config.block_num_heads = [3, 2, 3]
    with pytest.raises(ValueError, match="per-block head counts or FFN widths"):
        to_diffusers(DiT(config), tmp_path / "x")


# Wan2.1-I2V: CLIP image tokens through the image embedder and the image K/V of every cross-attention;
# diffusers splits its encoder_hidden_states into image and text by a text length of 512
I2V = dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=8, in_channels=9, out_channels=4,
           text_dim=12, freq_dim=16, ffn_dim=30, num_layers=3, cross_attn_norm=True, rope_max_seq_len=32,
           image_dim=10, added_kv_proj_dim=24)


def _i2v_inputs(B=2, image_len=7):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, I2V["in_channels"], 3, 6, 10, generator=g)  # noise + mask + image latents on channels
    t = torch.tensor([3.0, 731.5])[:B]
    return x, t, torch.randn(B, 512, I2V["text_dim"], generator=g), torch.randn(B, image_len, I2V["image_dim"], generator=g)


def test_i2v_transformer_matches_wan_forward():
    wan = _random_wan(I2V)
    config, sd = from_diffusers(wan)
    assert config.image_dim == 10 and config.in_channels == 9
    ours = DiT(config).eval()
    ours.load_state_dict(sd)
    x, t, c, img = _i2v_inputs()
    with torch.no_grad():
        want = wan(x, t, c, encoder_hidden_states_image=img, return_dict=False)[0]
        assert_close(ours(x, t, c, img), want, 1e-5, "I2V")
        ours.backend = "ref"
        assert_close(ours(x, t, c, img), want, 1e-5, "I2V ref backend")
        # the image matters: other image tokens, another output
        assert (ours(x, t, c, torch.randn_like(img)) - want).abs().max() > 1e-3
    # the state dict alone: image_dim and the image K/V width are read off the shapes
    c2, sd2 = from_diffusers(wan.state_dict(), num_heads=3)
    assert c2.image_dim == 10 and sorted(sd2) == sorted(sd)


def test_i2v_block_pruned_student_round_trips_through_diffusers(tmp_path):
    from diffusers import WanTransformer3DModel

    wan = _random_wan(I2V)
    config, sd = from_diffusers(wan)
    student_cfg = dataclasses.replace(config, block_ids=[0, 2])
    student = DiT(student_cfg).eval()
    student.load_state_dict({("blocks.1." + k.split(".", 2)[2]) if k.startswith("blocks.2.") else k: v
                             for k, v in sd.items() if not k.startswith("blocks.1.")})
    out = to_diffusers(student, tmp_path / "i2v_student")
    assert json.loads((out / "config.json").read_text())["added_kv_proj_dim"] == 24
    loaded = WanTransformer3DModel.from_pretrained(out).eval()
    x, t, c, img = _i2v_inputs()
    with torch.no_grad():
        assert_close(loaded(x, t, c, encoder_hidden_states_image=img, return_dict=False)[0], student(x, t, c, img),
                     1e-5, "I2V student in diffusers")


def test_i2v_inputs_are_checked_before_compute():
    config, sd = from_diffusers(_random_wan(I2V))
    ours = DiT(config).eval()
    x, t, c, img = _i2v_inputs()
    with pytest.raises(ValueError, match="reads CLIP image tokens: pass image_context of shape \\(2, Li, 10\\)"):
        ours(x, t, c)
    with pytest.raises(ValueError, match="image_context must be \\(2, Li, 10\\), got \\(2, 7, 9\\)"):
        ours(x, t, c, img[..., :9])
    t2v = DiT(dataclasses.replace(config, image_dim=None)).eval()
    with pytest.raises(ValueError, match="takes no image tokens"):
        t2v(x, t, c, img)


def test_flf2v_transformer_is_refused_clearly():
    wan = WanTransformer3DModel(**dict(I2V, pos_embed_seq_len=14))
    with pytest.raises(ValueError, match="first-last-frame .FLF2V."):
        from_diffusers(wan)
    with pytest.raises(ValueError, match="first-last-frame .FLF2V."):
        from_diffusers(wan.state_dict(), num_heads=3)