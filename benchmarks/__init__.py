"""Benchmarks: ``python -m benchmarks.engine`` (in-process engine vs raw decode ceiling)."""
