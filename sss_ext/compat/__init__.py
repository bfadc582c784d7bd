"""Other libraries' sampling signatures on top of :func:`sss_ext.verify`.

* :mod:`sss_ext.compat.flashinfer`: ``chain_speculative_sampling`` with FlashInfer's
  signature, shapes, output layout and counters, on CPU and CUDA, plus keyword-only
  arguments for the reward shift (docs/compat.md).
"""
