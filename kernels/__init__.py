"""Triton kernels for nanollm: FlashAttention-2 with a split-K decode path (flash_attention.py), fused
RMSNorm (rmsnorm.py) and fused chunked cross-entropy (cross_entropy.py). Each file documents its math;
tests: `TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels.py`; speed: `python -m bench.kernels`."""
