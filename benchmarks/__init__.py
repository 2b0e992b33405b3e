"""Benchmarks with reproducible commands: each imports the package and writes its results under docs/results/."""
