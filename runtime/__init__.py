"""The modelyard serving runtime: one PyTorch model behind the Open Inference Protocol.

Public surface (everything else is private to the runtime)::

    from modelyard.runtime import RuntimeConfig, parse_config, create_app, Runtime, Handler

The command is ``modelyard-runtime`` (``python -m modelyard.runtime``); the
client is :mod:`modelyard.runtime.client`.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Handler", "Runtime", "RuntimeConfig", "__version__", "create_app", "parse_config"]


def __getattr__(name: str) -> object:
    # Lazy: importing the package (e.g. for __version__ or the client) must not import torch.
    if name in ("RuntimeConfig", "parse_config"):
        from modelyard.runtime import config

        return getattr(config, name)
    if name in ("Runtime", "create_app"):
        from modelyard.runtime import server

        return getattr(server, name)
    if name == "Handler":
        from modelyard.runtime.handlers import Handler

        return Handler
    raise AttributeError(name)
