"""Real scrapes of vLLM's ``/metrics`` (``data/vllm_metrics.txt``; its header says how they
were made): v1 is the tiny demo Llama, v2 its slow variant, under the same traffic.

``SCRAPES[("v1", "before")]``... with moments ``before`` and ``after`` (15 requests
apart) for both versions, and for v1 ``busy`` (40 long completions at once: 32 running,
7 waiting when scraped) and ``idle`` (once they were done)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).parent / "data" / "vllm_metrics.txt"
_MARK = "# ==== scrape "


def _load() -> dict[tuple[str, str], str]:
    out = {}
    for chunk in DATA.read_text().split(_MARK)[1:]:
        head, _, body = chunk.partition("\n")
        version, moment = head.split()
        out[(version, moment)] = body
    return out


SCRAPES = _load()

