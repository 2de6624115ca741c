"""Benchmarks for hsmocsp (run with ``python -m bench.compare``; not part of the package)."""
