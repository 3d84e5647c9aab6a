"""Server scripts of the benchmark peers; each runs inside its own venv (see bench/peers.py)."""
