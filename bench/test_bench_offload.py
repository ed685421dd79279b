"""Block offload on a Wan2.1-14B-shaped, 30%-pruned student (random weights) at 480p x 81 frames
with the GPU's memory capped at 24 GiB: peak memory and its slowdown vs resident weights (GPU).

The resident run gets the whole card (the cap is set after it); the offloaded one runs under
`torch.cuda.set_per_process_memory_fraction(24 GiB / card)`. Weights are random normal
(filled in chunks; their values do not change the time)."""

import pytest
import torch

from timing import median_seconds

WAN_14B = dict(in_channels=16, out_channels=16, patch_size=(1, 2, 2), num_heads=40, head_dim=128, ffn_dim=13824,
               text_dim=4096, freq_dim=256, num_layers=40)
LATENT = (1, 16, 21, 60, 104)  # 480p x 81 frames: 32760 tokens


def _student():
    from flgengine.config import ModelConfig
    from flgengine.model import DiT

    from test_bench_dit import _keep_70_percent

    cfg = ModelConfig(**WAN_14B, block_ids=_keep_70_percent(40))
    with torch.device("meta"):
        model = DiT(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.cast(torch.bfloat16).eval()


@pytest.mark.gpu
def test_offload_14b_under_24_gib(benchmark):
    from flgengine.offload import enable_block_offload

    dev = torch.device("cuda")
    model = _student()
    x = torch.randn(LATENT, device=dev, dtype=torch.bfloat16)
    t, ctx = torch.tensor([500.0], device=dev), torch.randn(1, 512, 4096, device=dev, dtype=torch.bfloat16)
    block = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    with torch.no_grad():
        model.to(dev)
        resident = median_seconds(lambda: model(x, t, ctx), dev, repeat=2, warmup=1)
        model.to("cpu")
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, 24 * 2**30 / total), dev)
        torch.cuda.reset_peak_memory_stats(dev)
        enable_block_offload(model, dev)
        offloaded = median_seconds(lambda: model(x, t, ctx), dev, repeat=2, warmup=1)
        benchmark.pedantic(lambda: model(x, t, ctx), rounds=1, iterations=1)
        peak = torch.cuda.max_memory_allocated(dev)
    torch.cuda.set_per_process_memory_fraction(1.0, dev)
    benchmark.extra_info.update({"resident_s": resident, "offloaded_s": offloaded, "slowdown": offloaded / resident,
                                 "peak_GiB": peak / 2**30, "block_GiB": block / 2**30, "params": model.num_params()})
    print(f"\noffload 14B-shaped pruned ({len(model.blocks)} blocks, {model.num_params() / 1e9:.1f}B params): "
          f"resident {resident:.2f} s, offloaded {offloaded:.2f} s ({offloaded / resident:.2f}x), peak "
          f"{peak / 2**30:.1f} GiB under a 24 GiB cap (a block: {block / 2**30:.2f} GiB)")
