"""Block offload: mistakes are clear errors before anything loads (CPU); on a GPU the streamed
DiT gives the resident one's video with at most two blocks' weights on the card."""

import pytest
import torch

import flgengine


def test_offload_mistakes_are_clear_errors():
    with pytest.raises(ValueError, match="on the CPU the weights are in memory already"):
        flgengine.load("shapes-4step", device="cpu", offload="blocks")
    with pytest.raises(ValueError, match="offload='layers' is not one of blocks"):
        flgengine.load("shapes-4step", device="cpu", offload="layers")
    with pytest.raises(ValueError, match="an engine .* holds its own"):
        flgengine.load("shapes-4step", engine="engines/x", offload="blocks")
    from flgengine.offload import enable_block_offload

    with pytest.raises(ValueError, match="streams block weights from CPU memory to a GPU"):
        enable_block_offload(flgengine.load("shapes-4step", device="cpu").dit, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_blocks_give_the_resident_video_with_two_blocks_on_the_card():
    want = flgengine.load("shapes-teacher", device="cuda", dtype="bf16")("a red circle moving left", seed=1,
                                                                         steps=6, progress=False)
    pipe = flgengine.load("shapes-teacher", device="cuda", dtype="bf16", offload="blocks")
    for expert in pipe.dit.experts:
        assert all(p.device.type == "cpu" and p.is_pinned() for p in expert.blocks.parameters())
    got = pipe("a red circle moving left", seed=1, steps=6, progress=False)
    assert (got.float() - want.float()).abs().max() <= 1
    block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in pipe.dit.high.blocks)
    assert pipe.dit.high.offload.resident_bytes() <= 2 * block
