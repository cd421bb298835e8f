"""r4b benchmarks: one bench_<op>.py per op plus a shared harness (bench/harness.py)."""
