"""`ttscale bench`: benchmarks of whole engines, each in its own subprocess (throughput.py)."""
