"""The activator's settings: each a flag ``--name-with-dashes`` and a variable
``MODELYARD_ACTIVATOR_NAME``; the flag wins over the variable, the variable over the
default.

How long a request is held depends on the model's engine (:meth:`Settings.hold_seconds`):
a tensor model (``runtime.engine: modelyard``) loads in seconds, so ``timeout_seconds``
(120 s) covers scheduling, the image and the load; a generative model
(``runtime.engine: vllm``) fetches and loads gigabytes of weights, then compiles and
warms its engine, which takes minutes, so it gets ``generative_timeout_seconds`` (600 s,
the default request timeout of the OpenAI SDKs such clients use: a hold longer than the
client waits helps no one)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from modelyard import contract

PROG = "modelyard activator"

# runtime.engine values that serve generative models (the ModelDeployment's API): their
# cold start is the weights' load plus the engine's start, minutes on a big model.
GENERATIVE_ENGINES = frozenset({"vllm"})


@dataclass(frozen=True)
class Settings:
    """Every knob; each is a flag ``--name-with-dashes`` and ``MODELYARD_ACTIVATOR_NAME``."""

    host: str = "0.0.0.0"
    port: int = 8080
    admin_port: int = 9090
    timeout_seconds: float = 120.0
    generative_timeout_seconds: float = 600.0
    max_body_bytes: int = 64 * 1024 * 1024
    poll_seconds: float = 0.5
    cache_seconds: float = 1.0
    retry_after_seconds: int = 5
    connect_timeout_seconds: float = 2.0
    upstream_timeout_seconds: float = 600.0
    cluster_domain: str = "cluster.local"
    check_model_deployment: bool = True
    log_level: str = "info"

    def hold_seconds(self, engine: str | None) -> float:
        """The longest hold for a model served by ``engine`` (``runtime.engine``; None
        when unknown: the ModelDeployment was not read)."""
        if engine in GENERATIVE_ENGINES:
            return self.generative_timeout_seconds
        return self.timeout_seconds


_CONVERT: dict[type | str, Any] = {"int": int, "float": float, "bool": contract.parse_bool,
                                   "str": str}


def parse_settings(argv: Sequence[str] | None = None,
                   environ: Mapping[str, str] | None = None, *, prog: str = PROG) -> Settings:
    """Flags over ``MODELYARD_ACTIVATOR_*`` variables over the defaults."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Hold requests for models scaled to zero; forward them once a "
                    "replica is ready.",
        epilog="Every flag mirrors MODELYARD_ACTIVATOR_<NAME>; the flag wins.")
    for item in fields(Settings):
        parser.add_argument("--" + item.name.replace("_", "-"), dest=item.name, default=None,
                            help=f"MODELYARD_ACTIVATOR_{item.name.upper()} "
                                 f"(default {item.default})")
    flags = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    for item in fields(Settings):
        raw = flags[item.name]
        if raw is None:
            raw = env.get(f"MODELYARD_ACTIVATOR_{item.name.upper()}")
        if raw is None:
            continue
        try:
            values[item.name] = _CONVERT[str(item.type)](raw)
        except ValueError as error:
            parser.error(f"--{item.name.replace('_', '-')}: {error}")
    settings = Settings(**values)
    if min(settings.timeout_seconds, settings.generative_timeout_seconds,
           settings.poll_seconds) <= 0:
        parser.error("--timeout-seconds, --generative-timeout-seconds and --poll-seconds "
                     "must be positive")
    return settings
