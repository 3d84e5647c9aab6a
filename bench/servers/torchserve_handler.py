"""TorchServe handler: OIP JSON body, stdlib json in the worker, batched by the frontend.

The model is loaded by ``common.load_any`` in the benchmark's format, as every peer loads it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from common import load_any  # bench/servers, on the workers' PYTHONPATH
from ts.torch_handler.base_handler import BaseHandler


def _log_batch(size: int) -> None:
    target = os.environ.get("BENCH_BATCH_LOG")
    if target:
        with open(target, "a", encoding="ascii") as file:
            file.write(f"{size}\n")


class ResNetHandler(BaseHandler):  # type: ignore[misc]
    def initialize(self, context) -> None:  # type: ignore[no-untyped-def]
        torch.set_num_threads(1)
        model_dir = context.system_properties.get("model_dir")
        served = os.path.basename(os.environ["BENCH_MODEL_PATH"])  # archived by that name
        self.model = load_any(os.path.join(model_dir, served),
                              os.environ.get("BENCH_MODEL_FORMAT", "torchscript"))
        self.initialized = True

    def preprocess(self, data):  # type: ignore[no-untyped-def]
        items = []
        for row in data:
            body = row.get("body") or row.get("data")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            item = body["inputs"][0]
            items.append(np.asarray(item["data"], dtype=np.float32).reshape(item["shape"])[0])
        return torch.from_numpy(np.stack(items))

    def inference(self, x, *args, **kwargs):  # type: ignore[no-untyped-def]
        with torch.inference_mode():
            y = self.model(x)
        _log_batch(x.shape[0])
        return y

    def postprocess(self, y):  # type: ignore[no-untyped-def]
        return [
            {
                "outputs": [
                    {
                        "name": "output",
                        "datatype": "FP32",
                        "shape": [1, row.numel()],
                        "data": row.tolist(),
                    }
                ]
            }
            for row in y
        ]
