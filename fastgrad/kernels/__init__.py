"""Triton kernels (imported lazily by :mod:`fastgrad.ops` when the ``triton`` backend runs).

On CPU tensors they run under ``TRITON_INTERPRET=1``. Each module holds one op's kernels and launchers.
"""
