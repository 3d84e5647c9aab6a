"""``python -m modelyard.activator``: the same as ``modelyard activator``."""

from .server import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m modelyard.activator"))
