"""The page at ``/`` in headless Chromium (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
from playwright import sync_api  # noqa: E402 - the dev extra; `make test` installs it

if not Path(CHROMIUM).exists():  # scripts/bootstrap installs it: absent means a broken setup
    pytest.fail("Debian's chromium browser is absent: run scripts/bootstrap "
                "(scripts/system-packages.txt)", pytrace=False)

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


def test_page_shows_metadata_and_runs_a_tensor(browser, mlp_server) -> None:
    page = browser.new_page()
    try:
        page.goto(mlp_server.url + "/")
        page.wait_for_selector("body[data-loaded=true]", timeout=20_000)
        assert page.text_content("#model-name") == "mlp"
        assert page.text_content("#model-version") == "3"
        assert page.text_content("#status") == "ready"
        metadata = page.text_content("#metadata")
        for text in ("input", "[-1, 4]", "logits", "INT64"):
            assert text in metadata
        assert page.is_hidden("#image-section")

        request = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                               "data": [1, 2, 3, 4]}]}
        page.fill("#request", json.dumps(request))
        page.click("#submit")
        page.wait_for_function(
            "document.getElementById('took').textContent.startsWith('HTTP')", timeout=20_000
        )
        assert page.text_content("#took").startswith("HTTP 200")
        answer = json.loads(page.text_content("#result"))
        assert [o["name"] for o in answer["outputs"]] == ["logits", "label"]

        page.fill("#request", '{"inputs": [')  # a person's typo: shown, not a crash
        page.click("#submit")
        page.wait_for_function(
            "document.getElementById('took').textContent.startsWith('HTTP 400')", timeout=20_000
        )
        assert "malformed JSON" in page.text_content("#result")
    finally:
        page.close()


def test_page_uploads_an_image_to_the_classifier(browser, start_server, models: dict[str, Path],
                                                 tmp_path: Path) -> None:
    server = start_server({
        "MODELYARD_MODEL_NAME": "pictures",
        "MODELYARD_MODEL_URI": str(models["image"]),
        "MODELYARD_HANDLER": "modelyard.runtime.handlers:ImageClassifier",
    })
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (250, 10, 10)).save(image)
    page = browser.new_page()
    try:
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-loaded=true]", timeout=20_000)
        assert page.is_visible("#image-section")
        page.set_input_files("#image", str(image))
        page.click("#submit-image")
        page.wait_for_function(
            "document.getElementById('took').textContent.startsWith('HTTP')", timeout=20_000
        )
        assert page.text_content("#took").startswith("HTTP 200")
        predictions = json.loads(page.text_content("#result"))["predictions"]
        assert len(predictions[0]) == 5
        assert predictions[0][0]["label"].startswith("class_")
    finally:
        page.close()
