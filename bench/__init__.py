"""Benchmarks: python -m bench.NAME, each printing tables with the reference in the same run."""
