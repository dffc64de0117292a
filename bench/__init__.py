"""Benchmarks for edged, each a ratio against a baseline measured in the same run.

``python -m bench`` (``make bench``) runs them all; ``--only`` picks some, ``--quick`` shortens
every measuring window. Results go to ``bench/results.json`` and a table on stdout.
"""
