"""The ops as torch custom ops under torch.export and torch.compile: traced through the
facade (`registry.pick`, the backends' why_not) up to the custom ops, same results."""

import pytest
import torch

from flgengine import ops
from helpers import assert_close
from opcases import activations, needs_triton, nonzero, rope_tables


@needs_triton
def test_torch_export_traces_around_the_kernels(interpreter):
    class Attn(torch.nn.Module):
        def forward(self, q, k, w, cos, sin):
            qh, kh = ops.qk_norm_rope(q, k, w, w, cos, sin, 2, backend="triton")
            return ops.attention(qh, kh, kh, backend="triton")

    q, k, w = nonzero(1, 6, 16), nonzero(1, 6, 16), nonzero(16)
    cos, sin = rope_tables(6, 4, "cpu")
    ep = torch.export.export(Attn(), (q, k, w, cos, sin))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"flgengine.qk_norm_rope_triton.default", "flgengine.attention_triton.default"} <= targets, targets
    assert torch.equal(ep.module()(q, k, w, cos, sin), Attn()(q, k, w, cos, sin))


def _block(H):
    """A DiT-block-like chain of the four ops through the facade, as the model calls them."""
    def block(x, y, mod, w, cos, sin):
        h = ops.adaln_modulate(x, mod[:, 1], mod[:, 0], backend="triton")
        q, k = ops.qk_norm_rope(h, h * 0.5, w, w, cos, sin, H, backend="triton")
        o = ops.attention(q, k, k, backend="triton").flatten(2)
        return ops.gated_residual_adaln(x, o + y, mod[:, 2], mod[:, 4], mod[:, 3], backend="triton")
    return block


def _block_inputs(B, S, H, Dh, device):
    D = H * Dh
    x, y = activations(B, S, D, torch.bfloat16, device), activations(B, S, D, torch.bfloat16, device)
    mod, w = nonzero(B, 6, D, device=device), 1 + 0.1 * nonzero(D, device=device)
    return (x, y, mod, w, *rope_tables(S, Dh // 2, device))


@needs_triton
def test_torch_compile_fullgraph_through_the_facade(interpreter):
    # dynamo traces registry.pick and the triton why_not, then stops at the custom ops
    # (aot_eager: no C++ toolchain needed; the GPU test below uses inductor)
    args = _block_inputs(2, 8, 2, 8, "cpu")
    eager = _block(2)(*args)
    out = torch.compile(_block(2), fullgraph=True, backend="aot_eager")(*args)
    for a, b in zip(out, eager):
        assert torch.equal(a, b)



@pytest.mark.gpu
def test_gpu_triton_ops_under_torch_compile(compiled):
    args = _block_inputs(2, 64, 4, 40, "cuda")
    eager = _block(4)(*args)
    out = torch.compile(_block(4), fullgraph=True)(*args)
    for a, b in zip(out, eager):
        assert_close(a, b, 1e-2, "torch.compile (inductor) vs eager")
