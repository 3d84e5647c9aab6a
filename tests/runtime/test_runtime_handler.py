"""The handler hook and the shipped image classifier, through the real server."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from modelyard.runtime.client import Client
from modelyard.runtime.handlers import Handler, ImageClassifier
from modelyard.runtime.models import LoadedModel
from modelyard.runtime.protocol import TensorMeta


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def image_server(start_server, models: dict[str, Path], tmp_path_factory):
    labels = tmp_path_factory.mktemp("labels") / "labels.txt"
    labels.write_text("cat\ndog\nfox\nowl\nbee\n")
    return start_server({
        "MODELYARD_MODEL_NAME": "classifier",
        "MODELYARD_MODEL_URI": str(models["image"]),
        "MODELYARD_HANDLER": "modelyard.runtime.handlers:ImageClassifier",
        "MODELYARD_LABELS": str(labels),
        "MODELYARD_TOP_K": "3",
    })


def test_image_classification_top_k(image_server) -> None:
    with Client(image_server.url, "classifier") as client:
        predictions = client.predict([{"b64": png((255, 0, 0))}, png((0, 0, 255), (8, 8))])
    assert len(predictions) == 2
    for top in predictions:
        assert len(top) == 3
        assert {p["label"] for p in top} <= {"cat", "dog", "fox", "owl", "bee"}
        scores = [p["score"] for p in top]
        assert scores == sorted(scores, reverse=True)
        assert 0 < sum(scores) <= 1.0001
    status = httpx.get(f"{image_server.url}/v1/models/classifier").json()
    assert status["accepts_images"] is True


def test_image_answer_matches_local_preprocessing(image_server, models: dict[str, Path]) -> None:
    image = png((10, 200, 30))
    classifier = ImageClassifier()
    model = LoadedModel("c", "1", "x", lambda x: x, torch.device("cpu"),
                        [TensorMeta("image", "FP32", (-1, 3, 16, 16))], [])
    classifier.setup(model)
    tensor = classifier.preprocess({"b64": image})["image"]
    assert tensor.shape == (1, 3, 16, 16)
    scripted = torch.jit.load(str(models["image"]))
    with torch.no_grad():
        expected = classifier.postprocess({"logits": scripted(tensor)})
    with Client(image_server.url, "classifier") as client:
        (got,) = client.predict([{"b64": image}])
    assert [p["index"] for p in got] == [p["index"] for p in expected[:3]]


@pytest.mark.parametrize(
    ("instance", "fragment"),
    [({"b64": "!!!not base64!!!"}, "not a readable image"),
     ({"b64": base64.b64encode(b"plain text").decode()}, "not a readable image"),
     ({"bytes": "x"}, "b64"),
     (42, "b64")],
)
def test_bad_images_are_400(image_server, instance: object, fragment: str) -> None:
    response = httpx.post(f"{image_server.url}/v1/models/classifier:predict",
                          json={"instances": [instance]})
    assert response.status_code == 400
    assert fragment in response.json()["error"]
    good = httpx.post(f"{image_server.url}/v1/models/classifier:predict",
                      json={"instances": [{"b64": png((1, 2, 3))}]})
    assert good.status_code == 200


def test_oip_tensors_bypass_the_handler(image_server) -> None:
    import numpy as np

    with Client(image_server.url, "classifier") as client:
        out = client.infer({"image": np.zeros((2, 3, 16, 16), np.float32)})
    assert out["logits"].shape == (2, 5)


class Doubler(Handler):
    """A user's handler: instances are numbers; answers are words."""

    def preprocess(self, instance: object) -> dict[str, torch.Tensor]:
        value = float(instance)  # type: ignore[arg-type]
        return {"input": torch.full((1, 4), value)}

    def postprocess(self, outputs: dict[str, torch.Tensor]) -> object:
        return {"label": f"class-{int(outputs['label'][0])}"}


def test_a_user_handler_named_by_import_path(start_server, models: dict[str, Path]) -> None:
    server = start_server({
        "MODELYARD_MODEL_NAME": "words",
        "MODELYARD_MODEL_URI": str(models["mlp"]),
        "MODELYARD_HANDLER": "test_runtime_handler:Doubler",
    })
    response = httpx.post(f"{server.url}/v1/models/words:predict", json={"instances": [1, 2]})
    assert response.status_code == 200, response.text
    assert all(p["label"].startswith("class-") for p in response.json()["predictions"])


def test_a_handler_that_is_not_a_handler_stops_the_runtime(start_server,
                                                            models: dict[str, Path]) -> None:
    server = start_server({
        "MODELYARD_MODEL_NAME": "nohandler",
        "MODELYARD_MODEL_URI": str(models["mlp"]),
        "MODELYARD_HANDLER": "json:JSONDecoder",
    }, ready=False)
    assert server.wait_exit(timeout=60) == 1
    assert "not a modelyard Handler" in server.log()
