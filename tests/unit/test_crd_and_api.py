"""The CRD file is generated from the pydantic models and must not drift from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from modelyard.operator import api, crd, reference

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / crd.CRD_FILE


def test_committed_crd_matches_the_models() -> None:
    assert CRD_PATH.read_text() == crd.render_yaml(), (
        "crds/ is stale: run `.venv/bin/python -m modelyard.operator.crd`")
    assert crd.main(["--check", "--out", str(CRD_PATH)]) == 0


def test_check_mode_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "crd.yaml"
    stale.write_text("# old\n")
    assert crd.main(["--check", "--out", str(stale)]) == 1


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        out += _walk(sub, f"{path}.{name}")
    if "items" in schema:
        out += _walk(schema["items"], f"{path}[]")
    return out


def test_schema_is_structural_and_every_field_is_described() -> None:
    root = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(root["properties"]["spec"]) + _walk(root["properties"]["status"]):
        assert ("$ref" not in node and "anyOf" not in node) or node.get(
            "x-kubernetes-int-or-string"), path
        assert "title" not in node, path
        if path.count(".") >= 1:
            assert node.get("description"), f"{path} has no description"
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path


def test_crd_has_subresources_short_names_and_printer_columns() -> None:
    version = crd.crd()["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector"}
    assert "status" in version["subresources"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Version", "Target", "Canary", "Ready", "Replicas", "GPU", "URL", "Age"]
    assert crd.crd()["spec"]["names"]["shortNames"] == ["md", "mds"]


def test_the_example_parses_with_the_models() -> None:
    docs = list(yaml.safe_load_all((ROOT / "examples" / "resnet.yaml").read_text()))
    [md] = [d for d in docs if d["kind"] == "ModelDeployment"]
    spec = api.parse_spec(md["spec"])
    assert spec.resources.gpu is not None
    assert spec.resources.gpu.product == "NVIDIA-H100-80GB-HBM3"


def test_models_reject_what_the_schema_rejects() -> None:
    with pytest.raises(ValueError, match="version"):
        api.parse_spec({"model": {"uri": "s3://b/k"}})


def test_the_field_reference_in_docs_is_current() -> None:
    assert reference.main(["--check", "--out", str(ROOT / reference.REFERENCE_FILE)]) == 0, (
        "docs/reference.md is stale: run `.venv/bin/python -m modelyard.operator.reference`")
