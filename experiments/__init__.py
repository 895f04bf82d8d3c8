"""The papers' tables in miniature (reproduce.py, tables.py), the n-gram floor (ngram.py) and the benchmarks (bench.py).

Run from the repository root: python -m experiments.reproduce, python -m experiments.ngram, python -m experiments.bench.
"""
