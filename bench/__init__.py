"""Benchmarks of ddlib methods (see bench/README.md)."""
