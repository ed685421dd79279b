"""Round-to-nearest-even by hand, for kernels under Triton's interpreter: its fp32 -> bf16 and
fp32 -> e4m3 casts do not round to nearest even as a GPU does, so the kernels round the fp32
value exactly first (the cast is then exact) and CPU tests see the GPU's numerics."""

import triton
import triton.language as tl


@triton.jit
def round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32: the interpreter's own
    fp32 -> bf16 cast truncates, so its bf16 results would differ from a GPU's."""
    u = x.to(tl.uint32, bitcast=True)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def round_e4m3(x):
    """fp32 >= 0 -> the nearest e4m3 value (ties to even), kept in fp32: the interpreter's own
    fp32 -> fp8 cast does not round to nearest. Normal range: 3 mantissa bits kept by the bit
    trick; below e4m3's smallest normal (2^-6) the step is 2^-9, rounded by adding and
    subtracting 1.5 * 2^14 in fp32 (whose own rounding is to nearest even)."""
    u = x.to(tl.uint32, bitcast=True)
    normal = (((u + 0x7FFFF + ((u >> 20) & 1)) >> 20) << 20).to(tl.float32, bitcast=True)
    sub = (x + 24576.0) - 24576.0
    return tl.where(x < 0.015625, sub, normal)


@triton.jit
def to_e4m3(x, RTNE: tl.constexpr):
    """fp32 (already divided by its scale, |x| <= 448) -> e4m3, rounded to nearest even.
    RTNE: under the interpreter, round by hand first (exact) so the cast only changes the type."""
    if RTNE:
        r = round_e4m3(tl.abs(x))
        x = tl.where(x < 0, -r, r)
    return x.to(tl.float8e4nv)
