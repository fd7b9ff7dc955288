"""Triton kernels of pypattern (installed as ``pypattern.kernels``).

They run on CUDA tensors, or anywhere under ``TRITON_INTERPRET=1`` (which must be set before the first
``import triton``). Nothing here is imported unless the Triton backend is asked for.
"""
