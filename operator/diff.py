"""Decide whether a child object needs to be applied again, without asking the API.

An apply that changes nothing is still a write request, and a quiet cluster should
see none. :func:`needs_apply` says "apply" only when

* the object is missing,
* its ``modelyard.dev/applied-hash`` differs from the desired one (the spec
  changed, including fields we stopped setting), or
* a field we set has another value live (someone edited the object by hand).

The last check is a semantic subset: live objects carry server defaults we never
set, and the API server rewrites quantities (``0.5`` becomes ``500m``), so values
under ``resources`` compare as quantities. Called by :mod:`.reconcile`.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from .render import HASH_ANNOTATION


def applied_hash(obj: Mapping[str, Any] | None) -> str | None:
    if obj is None:
        return None
    value = obj.get("metadata", {}).get("annotations", {}).get(HASH_ANNOTATION)
    return str(value) if value is not None else None


def needs_apply(desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> bool:
    if live is None:
        return True
    if applied_hash(desired) != applied_hash(live):
        return True
    return not is_subset(desired.get("spec", {}), live.get("spec", {}))


def is_subset(desired: Any, live: Any, path: tuple[str, ...] = ()) -> bool:
    """Every value in ``desired`` is present and equal in ``live``."""
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return False
        return all(k in live and is_subset(v, live[k], (*path, str(k)))
                   for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(live, list) or len(desired) != len(live):
            return False
        return all(is_subset(d, x, path) for d, x in zip(desired, live, strict=True))
    if desired == live:
        return True
    if "resources" in path or "sizeLimit" in path:
        return _same_quantity(desired, live)
    return False


def _same_quantity(a: Any, b: Any) -> bool:
    try:
        return Decimal(parse_quantity(a)) == Decimal(parse_quantity(b))
    except (ValueError, InvalidOperation, TypeError):
        return False
