"""MLServer custom runtime (adaptive batching configured in model-settings.json)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from common import load, log_batch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class ResNet(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        self._model = load(os.environ["BENCH_MODEL_PATH"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = torch.from_numpy(NumpyCodec.decode_input(payload.inputs[0]))
        with torch.inference_mode():
            y = self._model(x).numpy()
        log_batch(x.shape[0])
        return InferenceResponse(
            model_name=self.name, outputs=[NumpyCodec.encode_output("output", y)]
        )
