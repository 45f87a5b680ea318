"""Random-weight checkpoints in the official layouts, for tests and benchmarks (never shipped)."""
