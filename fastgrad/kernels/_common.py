"""Launch settings shared by the Triton kernels, stated once (as Liger-Kernel's ``calculate_settings``): the
accumulation dtype (float64 for float64 inputs, float32 for every other), the block size of a row loop (the next
power of two of the row, capped per kernel by its registers), and the row maximum every softmax-like kernel starts
with."""
import torch
import triton
import triton.language as tl


def acc_tl(dtype: torch.dtype):
    """The accumulation dtype of a kernel on ``dtype`` inputs, as a Triton dtype (a ``tl.constexpr`` argument)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def acc_torch(dtype: torch.dtype) -> torch.dtype:
    """The same accumulation dtype, as a torch dtype (for the buffers a launcher allocates)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def block(n: int, cap: int) -> int:
    """Block size of a loop over ``n`` elements: the next power of two, at most ``cap`` (and at least 1)."""
    return min(triton.next_power_of_2(max(int(n), 1)), cap)


@triton.jit
def row_max(row, K, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """The maximum of ``row[0:K]`` in ``ACC`` (``-inf`` for an empty or fully masked row), one block at a time."""
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), ACC)
    for k0 in range(0, K, BLOCK):
        x = tl.load(row + k0 + cols, mask=k0 + cols < K, other=float("-inf")).to(ACC)
        m = tl.maximum(m, x)
    return tl.max(m, 0)
