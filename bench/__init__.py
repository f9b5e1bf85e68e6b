"""Benchmarks of jethpo: orchestration overhead, worker scaling, training, generation, metrics, memory.

Each module runs as ``python -m bench.NAME`` from the repository root, prints a table and
writes a JSON file under ``bench/results/``. ``bench/BENCHMARKS.md`` records the numbers.
"""
