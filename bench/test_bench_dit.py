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
        benchmark.extra_info["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        line += f"; roofline {roofline * 1e3:.1f} ms: " + ", ".join(f"{k} {v / roofline:.2f}x" for k, v in results.items())
        line += f"; peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    print(line)


# HunyuanVideo-13B-shaped: 20 dual- + 40 single-stream blocks, width 3072 (24 heads x 128), 256 text tokens
HUNYUAN_13B = dict(in_channels=16, out_channels=16, num_heads=24, head_dim=128, num_layers=20, num_single_layers=40,
                   num_refiner_layers=2, text_dim=4096, pooled_dim=768, guidance_embed=True)
# 480p x 61 frames: latent (16, 16, 60, 104) -> 16 x 30 x 52 = 24960 video tokens
HUNYUAN_LATENT = (1, 16, 16, 60, 104)
HUNYUAN_SMALL = dict(in_channels=4, out_channels=4, num_heads=4, head_dim=32, num_layers=3, num_single_layers=5,
                     num_refiner_layers=1, text_dim=64, pooled_dim=32, rope_axes=(8, 12, 12), guidance_embed=True)


def _keep_70_percent_per_kind(num_dual: int, num_single: int) -> list[int]:
    """Drop 30% of each kind's blocks, never the first or last of a kind (spread evenly)."""
    return (_keep_70_percent(num_dual)
            + [num_dual + i for i in _keep_70_percent(num_single)])


@pytest.mark.parametrize("size", [pytest.param("small", id="cpu-small"),
                                  pytest.param("hunyuan13b", id="cuda-hunyuan13b-480p-61f", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("pruned", [False, True], ids=["full", "pruned30"])
def test_hunyuan_forward(benchmark, size, pruned):
    """HunyuanVideo's DiT per backend, and its multiple of the roofline (GPU): FLOPs are
    2 x block params x (video + text tokens) + 4 x (S + L)^2 x D per block."""
    from flgengine.model.hunyuan import HunyuanVideoConfig, HunyuanVideoDiT

    big = size == "hunyuan13b"
    base, latent = (HUNYUAN_13B, HUNYUAN_LATENT) if big else (HUNYUAN_SMALL, (1, 4, 5, 16, 16))
    device = torch.device("cuda" if big else "cpu")
    dtype = torch.bfloat16 if big else torch.float32
    keep = _keep_70_percent_per_kind(base["num_layers"], base["num_single_layers"]) if pruned else None
    cfg = HunyuanVideoConfig(**base, block_ids=keep)
    torch.manual_seed(0)
    with torch.device(device):
        model = HunyuanVideoDiT(cfg).cast(dtype).eval()
    L = 256 if big else 16
    x = torch.randn(latent, device=device, dtype=dtype)
    t, g = torch.tensor([500.0], device=device), torch.tensor([6000.0], device=device)
    ctx, pooled = torch.randn(1, L, cfg.text_dim, device=device, dtype=dtype), torch.randn(1, cfg.pooled_dim, device=device, dtype=dtype)
    mask = torch.ones(1, L, dtype=torch.int64, device=device)
    S = latent[2] * latent[3] * latent[4] // 4

    def run():
        return model(x, t, ctx, g, context_mask=mask, pooled_text=pooled)

    results = {}
    with torch.no_grad():
        for backend in ("ref", "auto", "cuda", "triton") if big else ("ref", "cpu"):
            model.backend = None if backend == "auto" else backend
            results[backend] = median_seconds(run, device, repeat=3 if big else 10, warmup=1 if big else 2)
        benchmark.pedantic(run, rounds=2 if big else 3, iterations=1, warmup_rounds=1)
    block_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks") and p.dim() == 2)
    fl = 2 * block_params * (S + L) + 4 * (S + L) ** 2 * cfg.dim * len(cfg.kept_blocks)
    fast = min(results.values())
    benchmark.extra_info.update({"blocks": len(cfg.kept_blocks), "params": model.num_params(), "tokens": S + L,
                                 "seconds": results, "TFLOPs": fl / 1e12, "TFLOP_per_s": fl / fast / 1e12})
    line = (f"\nDiT hunyuan {size} {'pruned' if pruned else 'full'} ({len(cfg.kept_blocks)} blocks, "
            f"{model.num_params() / 1e6:.1f}M params, {S} + {L} tokens): "
            + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in results.items()) + f"; {fl / fast / 1e12:.1f} TFLOP/s")
    if big:
        import ceilings

        roofline = fl / (ceilings.measured("cuda")["matmul_TFLOPs"] * 1e12)
        benchmark.extra_info["x_roofline"] = {k: v / roofline for k, v in results.items()}
        benchmark.extra_info["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        line += f"; roofline {roofline * 1e3:.1f} ms: " + ", ".join(f"{k} {v / roofline:.2f}x" for k, v in results.items())
        line += f"; peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    print(line)
