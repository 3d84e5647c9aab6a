"""Pre/post-processing hooks: the user's small class, and a shipped image classifier.

The user names a :class:`Handler` subclass with ``MODELYARD_HANDLER=module:Class``;
``server.py`` builds it once, calls :meth:`Handler.setup` with the loaded model,
then for every instance of a ``/v1/models/{name}:predict`` request calls
:meth:`Handler.preprocess` (in a worker thread), batches the model inputs with
other requests, and calls :meth:`Handler.postprocess` on that instance's slice
of the outputs. OIP ``/v2/.../infer`` requests carry tensors and bypass the hook.

:class:`ImageClassifier` is the example: an encoded image (base64) in, top-k
labels out.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Any, ClassVar

import torch

from modelyard.runtime.errors import InvalidInput
from modelyard.runtime.models import LoadedModel

__all__ = ["Handler", "ImageClassifier"]


class Handler:
    """Turn one request instance into model inputs, and one output slice into an answer."""

    #: the web page offers an image upload when this is true
    accepts_images: ClassVar[bool] = False

    def setup(self, model: LoadedModel) -> None:
        """Called once after the model is loaded."""
        self.model = model

    def preprocess(self, instance: Any) -> dict[str, torch.Tensor]:
        """One instance -> input tensors with a batch dimension (usually 1)."""
        (meta,) = self.model.inputs
        try:
            tensor = torch.as_tensor(instance)
        except (TypeError, ValueError, RuntimeError) as error:
            raise InvalidInput(f"instance is not a tensor: {error}") from None
        return {meta.name: tensor.unsqueeze(0)}

    def postprocess(self, outputs: dict[str, torch.Tensor]) -> Any:
        """This instance's outputs (batch dimension kept) -> a JSON-able answer."""
        if len(outputs) == 1:
            return next(iter(outputs.values()))[0].tolist()
        return {name: t[0].tolist() for name, t in outputs.items()}


_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class ImageClassifier(Handler):
    """Encoded image (``{"b64": ...}`` or a base64 string) -> top-k ``{label, score}``.

    The input size comes from the model's declared input shape ``[-1, 3, H, W]``;
    labels from ``MODELYARD_LABELS`` (a file, one label a line), else ``class_<i>``;
    ``MODELYARD_TOP_K`` (default 5).
    """

    accepts_images = True

    def setup(self, model: LoadedModel) -> None:
        super().setup(model)
        (meta,) = model.inputs
        if len(meta.shape) != 4 or meta.shape[1] != 3 or -1 in meta.shape[2:]:
            raise InvalidInput(f"ImageClassifier needs an input of shape [-1, 3, H, W], got "
                               f"{list(meta.shape)}")
        self.input_name = meta.name
        self.size = (meta.shape[3], meta.shape[2])
        self.top_k = int(os.environ.get("MODELYARD_TOP_K", "5"))
        labels_file = os.environ.get("MODELYARD_LABELS")
        self.labels: list[str] = []
        if labels_file:
            with open(labels_file, encoding="utf-8") as file:
                self.labels = [line.strip() for line in file if line.strip()]

    def preprocess(self, instance: Any) -> dict[str, torch.Tensor]:
        from PIL import Image, UnidentifiedImageError

        encoded = instance.get("b64") if isinstance(instance, dict) else instance
        if not isinstance(encoded, str):
            raise InvalidInput('an image instance is {"b64": "<base64 of the encoded image>"}')
        if "," in encoded[:100] and encoded.startswith("data:"):
            encoded = encoded.split(",", 1)[1]  # a data: URL from the browser
        try:
            raw = base64.b64decode(encoded, validate=True)
            image = Image.open(io.BytesIO(raw)).convert("RGB").resize(self.size)
        except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as error:
            raise InvalidInput(f"not a readable image: {error}") from None
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        chw = pixels.view(self.size[1], self.size[0], 3).permute(2, 0, 1).float() / 255.0
        return {self.input_name: ((chw - _MEAN) / _STD).unsqueeze(0)}

    def postprocess(self, outputs: dict[str, torch.Tensor]) -> Any:
        logits = next(iter(outputs.values()))[0].float()
        probabilities = torch.softmax(logits, dim=-1)
        scores, indices = probabilities.topk(min(self.top_k, probabilities.numel()))
        return [
            {"label": self._label(int(i)), "index": int(i), "score": round(float(s), 6)}
            for s, i in zip(scores, indices, strict=True)
        ]

    def _label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else f"class_{index}"
