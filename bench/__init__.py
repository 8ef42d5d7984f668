"""Benchmarks (issue 9): each script prints its figures and writes them as JSON with ``--json PATH``."""
