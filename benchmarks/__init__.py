"""Benchmarks: speed and memory measured side by side in one run, reported as ratios to a baseline."""
