"""Triton kernels, packaged as ``crl_fast.kernels``. They know nothing of RL."""
