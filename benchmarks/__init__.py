"""Benchmarks with reproducible commands; each writes its results under docs/results/."""
