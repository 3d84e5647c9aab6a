"""Benchmarks of modelyard. ``python -m bench.runtime`` runs the serving-runtime benchmark."""
