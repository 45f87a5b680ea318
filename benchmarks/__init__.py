"""Benchmarks that print figures and record them under benchmarks/results/."""
