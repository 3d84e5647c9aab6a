"""Overload on the real server: a bounded queue (503 with Retry-After at once; gRPC's
UNAVAILABLE), deadlines that expire while queued (504 and DEADLINE_EXCEEDED, never reaching
the model), a client that disconnects taking its work out of the queue, and the counters.

One server, one scenario: its model holds every forward pass while a gate file exists,
so the queue's state is decided by the test, never by timing; the model records each
row it computes, so "never reached the model" is read from the model itself.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from runtime_support import free_port
from tritonclient.grpc import aio as grpcaio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException


def _body(value: float) -> bytes:
    return orjson.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [value] * 4}]})


def _samples(text: str) -> dict[tuple[str, str], float]:
    """(metric name, reason or '') -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, s.labels.get("reason", ""))] = s.value
    return out


def test_overload_deadlines_and_disconnects(start_server, models: dict[str, Path],  # noqa: PLR0915
                                            tmp_path: Path) -> None:
    gate, record = tmp_path / "gate", tmp_path / "record"
    server = start_server({
        "MODELYARD_MODEL_NAME": "gated",
        "MODELYARD_MODEL_FORMAT": "safetensors",
        "MODELYARD_MODEL_URI": str(models["slow"]),
        "MODELYARD_ENTRY_POINT": "runtime_testmodels:GatedRecorder",
        "MODELYARD_MAX_BATCH_SIZE": "2",
        "MODELYARD_MAX_DELAY_MS": "1",
        "MODELYARD_MAX_QUEUE_ITEMS": "5",
        "MODELYARD_GRPC_PORT": str(free_port()),
        "TESTMODEL_GATE": str(gate),
        "TESTMODEL_RECORD": str(record),
    })
    url = f"{server.url}/v2/models/gated/infer"

    def grpc_input(value: float) -> list[grpcaio.InferInput]:
        tensor = grpcaio.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.full((1, 4), value, np.float32))
        return [tensor]

    async def scenario() -> None:  # noqa: PLR0915 (one story, step by step)
        async with httpx.AsyncClient(timeout=60) as client, \
                grpcaio.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as rpc:

            async def metrics() -> dict[tuple[str, str], float]:
                return _samples((await client.get(f"{server.url}/metrics")).text)

            async def until(name: str, reason: str, value: float) -> None:
                for _ in range(3000):  # polls a state the test set up, bounded
                    if (await metrics()).get((name, reason)) == value:
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError(f"{name}{{{reason}}} never reached {value}")

            def send(value: float, **headers: str) -> asyncio.Task[httpx.Response]:
                return asyncio.ensure_future(client.post(url, content=_body(value),
                                                         headers=headers))

            gate.touch()  # the model holds every forward pass from now on
            running = send(1.0)
            await until("modelyard_inflight_requests", "", 1)
            await until("modelyard_queue_depth", "", 0)  # taken: in the model, held

            # a deadline that passes while queued: 504 then, and the model never sees it
            expiring = send(7.0, **{"Request-Timeout": "0.3"})
            expired = await expiring
            assert expired.status_code == 504
            assert "deadline" in expired.json()["error"]
            with pytest.raises(InferenceServerException) as late:  # OIP timeout, in µs
                await rpc.infer("gated", grpc_input(11.0), timeout=300_000)
            assert late.value.status() == "StatusCode.DEADLINE_EXCEEDED"

            queued = [send(float(v)) for v in (2, 3, 4, 5)]
            await until("modelyard_queue_depth", "", 4)

            # a client that leaves while queued frees its place
            with socket.create_connection((server.host, server.port)) as raw:
                body = _body(8.0)
                raw.sendall(b"POST /v2/models/gated/infer HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await until("modelyard_queue_depth", "", 5)
            await until("modelyard_queue_depth", "", 4)

            queued.append(send(6.0))
            await until("modelyard_queue_depth", "", 5)

            # the queue is full: refused at once, with a JSON error and Retry-After
            refused = await client.post(url, content=_body(9.0))
            assert refused.status_code == 503
            assert "queue is full" in refused.json()["error"]
            assert int(refused.headers["Retry-After"]) >= 1
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                request = service_pb2.ModelInferRequest(model_name="gated")
                request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
                request.raw_input_contents.append(np.full((1, 4), 12.0, np.float32).tobytes())
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as full:
                    await stub.ModelInfer(request)
            assert full.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "queue is full" in (full.value.details() or "")
            assert int(dict(full.value.trailing_metadata() or ())["retry-after"]) >= 1
            live = await client.get(f"{server.url}/v2/health/live")
            assert live.status_code == 200

            gate.unlink()  # the model runs again: everything admitted is answered
            answers = await asyncio.gather(running, *queued)
            for value, answer in zip((1, 2, 3, 4, 5, 6), answers, strict=True):
                assert answer.status_code == 200, answer.text
                assert answer.json()["outputs"][0]["data"] == [value * 2.0] * 4
            again = await client.post(url, content=_body(10.0))
            assert again.status_code == 200  # and it keeps serving

            seen = await metrics()
            assert seen[("modelyard_rejected_requests_total", "queue_full")] == 2
            assert seen[("modelyard_rejected_requests_total", "deadline")] == 2
            assert seen[("modelyard_rejected_requests_total", "disconnected")] == 1

    asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    computed = {float(line) for line in record.read_text().split()}
    assert {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 10.0} <= computed
    assert 7.0 not in computed  # expired while queued
    assert 8.0 not in computed  # its client disconnected while queued
    assert 9.0 not in computed  # refused
    assert 11.0 not in computed  # gRPC: expired while queued
    assert 12.0 not in computed  # gRPC: refused
