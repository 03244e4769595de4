"""effkern's Triton kernels, one module per op family (installed as ``effkern.kernels``).

The op layer imports these lazily, on first use of the triton backend, so importing
effkern does not import triton.
"""
