"""Benchmarks that measure a running Wattlane deployment and write docs/results."""
