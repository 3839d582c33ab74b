"""Benchmarks: one script per op (bench_<op>.py) on the shared harness in harness.py.

python -m benchmarks [--quick]                  every bench, table printed, rows appended, plots drawn
python -m benchmarks.bench_window_partition     one bench (same options)
"""
