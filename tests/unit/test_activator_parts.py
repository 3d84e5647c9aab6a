"""The activator's pure parts: which model a Host names, which headers travel, which pods
are ready and where they listen, round robin, and its settings."""

from __future__ import annotations

from typing import Any

import pytest

from modelyard.activator.routing import (
    Endpoint,
    ModelRef,
    choose,
    forward_headers,
    parse_host,
    ready_endpoints,
)
from modelyard.activator.settings import Settings, parse_settings


@pytest.mark.parametrize("host", [
    "resnet.vision", "resnet.vision.svc", "resnet.vision.svc.cluster.local",
    "resnet.vision:80", "resnet.vision.svc:8080", "resnet.vision.svc.cluster.local:80",
    "ResNet.Vision.SVC", "resnet.vision.svc.cluster.local.",
])
def test_service_names_name_their_model(host: str) -> None:
    assert parse_host(host) == ModelRef(namespace="vision", name="resnet")


@pytest.mark.parametrize("host", [
    None, "", "resnet", "localhost:8080", "10.200.0.7:8080", "10.200.0.7", "10.96",
    "[::1]:8080", "resnet.vision.svc.example.com", "resnet.vision.cluster.local",
    "resnet.vision.pod", "a.b.c", "resnet.vision:http", "-bad.vision", "res_net.vision",
    "resnet..svc", f"{'x' * 64}.vision",
])
def test_other_hosts_name_nothing(host: str | None) -> None:
    assert parse_host(host) is None


def test_another_cluster_domain() -> None:
    assert parse_host("m.ns.svc.corp.internal", "corp.internal") == ModelRef("ns", "m")
    assert parse_host("m.ns.svc.cluster.local", "corp.internal") is None


def test_hop_by_hop_headers_stay_behind() -> None:
    headers = [
        ("Host", "m.ns.svc"), ("Connection", "keep-alive, X-Session"), ("Keep-Alive", "5"),
        ("X-Session", "abc"), ("Transfer-Encoding", "chunked"), ("TE", "trailers"),
        ("Upgrade", "h2c"), ("Proxy-Authorization", "Basic x"), ("Content-Length", "12"),
        ("Content-Type", "application/json"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
        ("Authorization", "Bearer t"),
    ]
    assert forward_headers(headers, drop=("content-length",)) == [
        ("Host", "m.ns.svc"), ("Content-Type", "application/json"), ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"), ("Authorization", "Bearer t"),
    ]
    assert ("Content-Length", "12") in forward_headers(headers)


def _pod(ip: str | None, ready: bool = True, deleting: bool = False,
         ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "metadata": {"name": f"pod-{ip}"},
        "spec": {"containers": [{"name": "runtime", "ports": ports if ports is not None
                                 else [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running",
                   "conditions": [{"type": "PodScheduled", "status": "True"},
                                  {"type": "Ready", "status": "True" if ready else "False"}]},
    }
    if ip:
        pod["status"]["podIP"] = ip
    if deleting:
        pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return pod


def test_only_ready_live_pods_with_an_address_are_endpoints() -> None:
    pods = [
        _pod("10.0.0.3"),
        _pod("10.0.0.1", ports=[{"name": "metrics", "containerPort": 9090},
                                {"name": "http", "containerPort": 9000}]),
        _pod("10.0.0.2", ready=False),  # still loading its model
        _pod("10.0.0.4", deleting=True),  # terminating: draining, no new work
        _pod(None),  # not yet given an address
        _pod("10.0.0.5", ports=[]),  # no port named http: the runtime's default
        {"metadata": {"name": "pending"}, "spec": {"containers": []}, "status": {}},
    ]
    assert ready_endpoints(pods) == [
        Endpoint("10.0.0.1", 9000), Endpoint("10.0.0.3", 8080), Endpoint("10.0.0.5", 8080),
    ]


def test_endpoint_urls() -> None:
    assert Endpoint("10.0.0.1", 8080).url == "http://10.0.0.1:8080"
    assert Endpoint("fd00::1", 8080).url == "http://[fd00::1]:8080"


def test_round_robin_skips_pods_that_refused() -> None:
    pods = [Endpoint("10.0.0.1", 8080), Endpoint("10.0.0.2", 8080), Endpoint("10.0.0.3", 8080)]
    assert [choose(pods, turn) for turn in range(4)] == [pods[0], pods[1], pods[2], pods[0]]
    assert {choose(pods, turn, exclude={pods[1]}) for turn in range(4)} == {pods[0], pods[2]}
    assert choose(pods, 7, exclude=pods) is None
    assert choose([], 0) is None


def test_settings_flags_win_over_environment() -> None:
    environ = {"MODELYARD_ACTIVATOR_TIMEOUT_SECONDS": "30", "MODELYARD_ACTIVATOR_PORT": "8081",
               "MODELYARD_ACTIVATOR_CHECK_MODEL_DEPLOYMENT": "false"}
    settings = parse_settings(["--timeout-seconds", "3", "--max-body-bytes", "1024"], environ)
    assert settings == Settings(port=8081, timeout_seconds=3.0, max_body_bytes=1024,
                                check_model_deployment=False)
    assert parse_settings([], {}) == Settings()


@pytest.mark.parametrize("argv", [["--timeout-seconds", "soon"], ["--timeout-seconds", "0"],
                                  ["--check-model-deployment", "maybe"]])
def test_bad_settings_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(argv, {})
