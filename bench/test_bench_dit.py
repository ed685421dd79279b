"""DiT forward latency: a Wan2.1-1.3B-shaped model, full depth vs 30% of blocks removed,
per backend, measured in one run (GPU); a small model on CPU.

FLOPs counted: 2 x params x tokens for the linear layers plus 4 x S^2 x D per
self-attention (QK^T and PV), per block. On a GPU the roofline is those FLOPs at the
card's measured bf16 matmul rate (bench/ceilings.py); each backend reports its time as
a multiple of it.
"""

import pytest
import torch

from flgengine.config import ModelConfig
from flgengine.model import DiT
from timing import median_seconds

WAN_1_3B = dict(in_channels=16, out_channels=16, patch_size=(1, 2, 2), num_heads=12, head_dim=128, ffn_dim=8960,
                text_dim=4096, freq_dim=256, num_layers=30)
# 480p x 81 frames: latent (16, 21, 60, 104) -> 21 x 30 x 52 = 32760 tokens
WAN_LATENT = (1, 16, 21, 60, 104)
SMALL = dict(in_channels=4, out_channels=4, patch_size=(1, 2, 2), num_heads=4, head_dim=32, ffn_dim=512,
             text_dim=64, freq_dim=64, num_layers=8)
SMALL_LATENT = (1, 4, 5, 16, 16)


def _keep_70_percent(n: int) -> list[int]:
    """Drop 30% of blocks, never the first or last (spread evenly in between)."""
    drop = round(0.3 * n)
    middle = list(range(1, n - 1))
    step = len(middle) / drop
    dropped = {middle[int(i * step + step / 2)] for i in range(drop)}
    return [i for i in range(n) if i not in dropped]


def _flops(cfg: ModelConfig, model: DiT, tokens: int) -> float:
    linear = 2 * sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks") and p.dim() == 2) * tokens
    attn = 4 * tokens**2 * cfg.dim * len(cfg.kept_blocks)
    return linear + attn


@pytest.mark.parametrize("size", [pytest.param("small", id="cpu-small"),
                                  pytest.param("wan1.3b", id="cuda-wan1.3b-480p", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("pruned", [False, True], ids=["full", "pruned30"])
def test_dit_forward(benchmark, size, pruned):
    base, latent = (WAN_1_3B, WAN_LATENT) if size == "wan1.3b" else (SMALL, SMALL_LATENT)
    device = torch.device("cuda" if size == "wan1.3b" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig(**base, block_ids=_keep_70_percent(base["num_layers"]) if pruned else None)
    torch.manual_seed(0)
    with torch.device(device):
        model = DiT(cfg).cast(dtype).eval()
    x = torch.randn(latent, device=device, dtype=dtype)
    t = torch.tensor([500.0], device=device)
    ctx = torch.randn(1, 512 if size == "wan1.3b" else 16, cfg.text_dim, device=device, dtype=dtype)
    tokens = latent[2] * latent[3] * latent[4] // 4
    results = {}
    with torch.no_grad():
        # "auto": no preference, each op's automatic pick (the default a user gets)
        for backend in ("ref", "auto", "cuda", "triton") if device.type == "cuda" else ("ref", "cpu"):
            model.backend = None if backend == "auto" else backend
            results[backend] = median_seconds(lambda: model(x, t, ctx), device, repeat=5 if size == "wan1.3b" else 10, warmup=2)
        benchmark.pedantic(lambda: model(x, t, ctx), rounds=3, iterations=1, warmup_rounds=1)
    fl = _flops(cfg, model, tokens)
    fast = min(results.values())
    benchmark.extra_info.update({
        "blocks": len(cfg.kept_blocks), "params": model.num_params(), "tokens": tokens,
        "seconds": results, "TFLOPs": fl / 1e12, "TFLOP_per_s": fl / fast / 1e12,
        "speedup_vs_ref": {k: results["ref"] / v for k, v in results.items()},
    })
    line = (f"\nDiT {size} {'pruned' if pruned else 'full'} ({len(cfg.kept_blocks)} blocks, {model.num_params() / 1e6:.0f}M params, "
            f"{tokens} tokens): " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in results.items())
            + f"; {fl / fast / 1e12:.1f} TFLOP/s")
    if device.type == "cuda":
        import ceilings

        roofline = fl / (ceilings.measured("cuda")["matmul_TFLOPs"] * 1e12)
        benchmark.extra_info["x_roofline"] = {k: v / roofline for k, v in results.items()}
        line += f"; roofline {roofline * 1e3:.1f} ms: " + ", ".join(f"{k} {v / roofline:.2f}x" for k, v in results.items())
    print(line)
