"""Tiny random checkpoints in the upstream format, for tests and benchmarks."""
