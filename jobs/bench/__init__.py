"""Benchmarks (not tests): `python -m jobs.bench --help`. Each run measures its targets side by side and
prints ratios taken in that same run; docs/benchmarks.md records the figures with their commands."""
