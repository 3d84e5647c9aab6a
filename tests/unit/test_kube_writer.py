"""The Writer's table of the kinds the operator owns (no cluster: nothing is called)."""

from __future__ import annotations

import pytest
from kubernetes import client

from modelyard.operator import api, render
from modelyard.operator.kube import Writer


def test_a_kind_the_operator_does_not_own_is_refused_before_any_request() -> None:
    writer = Writer(client.ApiClient(client.Configuration(host="http://127.0.0.1:9")))
    with pytest.raises(ValueError, match="does not write ConfigMap"):
        writer.apply({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": "x", "namespace": "default"}})
    with pytest.raises(ValueError, match="does not write Deployment"):
        writer.delete("apps/v1beta1", "Deployment", "default", "x")


def test_every_kind_render_produces_has_its_typed_calls() -> None:
    owner = render.Owner("resnet", "vision", "uid-1")
    spec = api.parse_spec({"model": {"version": "3", "uri": "s3://models/resnet/3/model.pt"}})
    rendered = [render.render_deployment(owner, spec, 1), render.render_service(owner),
                render.render_version_service(owner, "3"),
                render.render_preview_service(owner, "3"),
                render.render_activator_slice(owner, ["10.0.0.1"], 8080),
                render.render_httproute(owner, spec, {"3": 100})]
    writer = Writer(client.ApiClient(client.Configuration(host="http://127.0.0.1:9")))
    for obj in rendered:
        assert writer._kind(obj["apiVersion"], obj["kind"]) is not None
