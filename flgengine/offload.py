"""Block offload for cards smaller than the model: `load(..., offload="blocks")`.

The DiT's blocks keep their weights in pinned CPU memory; everything else (embeddings, head)
lives on the GPU. Before block i runs, its weights are on the GPU: copied on a side stream
while block i - 1 computed (one block ahead), so the copy hides behind the compute when a block's
compute takes longer than its copy (PCIe / NVLink-C2C bandwidth vs the block's FLOPs at the
video's token count). After block i runs, its GPU copy is released (the caching allocator
reuses it once the main stream is past it: `record_stream`). At most two blocks' weights are on
the GPU at once. The last block prefetches block 0 for the next step.

Composes with FP8 weights (the e4m3 tensors and their scales are what is copied: half of bf16's
bytes) and with LoRAs (merged before). Not with the CUDA-graph loop (a graph cannot hold the
host-side hooks that move weights) nor with engines (they hold their own weights).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["OFFLOAD_KINDS", "BlockOffload", "enable_block_offload"]

OFFLOAD_KINDS = ("blocks",)


def _tensors(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owner module, attribute) of every parameter and buffer of `module`."""
    out = []
    for m in module.modules():
        out += [(m, n) for n, p in m._parameters.items() if p is not None]
        out += [(m, n) for n, b in m._buffers.items() if b is not None]
    return out


class BlockOffload:
    """Streams `blocks` (an nn.ModuleList) to `device` one block ahead (see the module docstring)."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device):
        self.blocks, self.device = blocks, torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self.slots = [_tensors(b) for b in blocks]
        self.cpu: list[list[torch.Tensor]] = []
        for slot in self.slots:  # pinned CPU copies: the only home of the block weights
            pinned = []
            for m, n in slot:
                t = getattr(m, n)
                t.data = t.data.to("cpu").pin_memory()
                pinned.append(t.data)
            self.cpu.append(pinned)
        self.fetched: dict[int, tuple[list[torch.Tensor], torch.cuda.Event]] = {}
        self.handles = []
        for i, b in enumerate(blocks):
            self.handles.append(b.register_forward_pre_hook(self._pre(i)))
            self.handles.append(b.register_forward_hook(self._post(i)))

    def _fetch(self, i: int) -> None:
        """Block i's weights to the GPU on the side stream; an event marks the copy done."""
        if i in self.fetched:
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # its buffers may be reused memory
        with torch.cuda.stream(self.stream):
            gpu = [t.to(self.device, non_blocking=True) for t in self.cpu[i]]
            done = torch.cuda.Event()
            done.record(self.stream)
        self.fetched[i] = (gpu, done)

    def _pre(self, i: int):
        def hook(module, args):
            self._fetch(i)  # not prefetched (the first block of the first step)
            gpu, done = self.fetched.pop(i)
            main = torch.cuda.current_stream(self.device)
            main.wait_event(done)
            for (m, n), t in zip(self.slots[i], gpu):
                t.record_stream(main)  # freed only once the main stream is past this block
                getattr(m, n).data = t
            self._fetch((i + 1) % len(self.blocks))  # one block ahead (block 0 of the next step last)
        return hook

    def _post(self, i: int):
        def hook(module, args, output):
            for (m, n), t in zip(self.slots[i], self.cpu[i]):
                getattr(m, n).data = t  # back to the pinned copy; the GPU one goes with the last reference
        return hook

    def resident_bytes(self) -> int:
        """Bytes of block weights on the GPU now (between forwards: the one prefetched block)."""
        return sum(t.numel() * t.element_size() for gpu, _ in self.fetched.values() for t in gpu)


def enable_block_offload(model: nn.Module, device) -> nn.Module:
    """`model` (a DiT of any family, or a TwoExpertDiT) with its non-block weights on `device`
    and each expert's blocks streamed (BlockOffload); returns it."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"offload='blocks' streams block weights from CPU memory to a GPU; the device is {device}: "
                         "on the CPU the weights are in memory already (drop offload=)")
    experts = getattr(model, "experts", None) or (model,)
    for expert in experts:
        blocks = expert.blocks
        expert.blocks = nn.ModuleList()  # everything else moves to the GPU
        expert.to(device)
        expert.blocks = blocks
        expert.offload = BlockOffload(blocks, device)
    return model
