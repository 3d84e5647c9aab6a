"""LitServe server with its batching (16 / 5 ms), same OIP JSON body on /predict.

python bench/servers/litserve_server.py MODEL_PATH PORT
"""

from __future__ import annotations

import sys

import litserve as ls
import numpy as np
import torch
from common import load, log_batch


class ResNetAPI(ls.LitAPI):  # type: ignore[misc]
    def setup(self, device: str) -> None:
        self.model = load(sys.argv[1])

    def decode_request(self, request: dict) -> torch.Tensor:  # type: ignore[type-arg]
        item = request["inputs"][0]
        array = np.asarray(item["data"], dtype=np.float32).reshape(item["shape"])
        return torch.from_numpy(array[0])

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        with torch.inference_mode():
            y = self.model(x)
        log_batch(x.shape[0])
        return y

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, output: torch.Tensor) -> dict:  # type: ignore[type-arg]
        row = output.reshape(1, -1)
        return {
            "outputs": [
                {
                    "name": "output",
                    "datatype": "FP32",
                    "shape": list(row.shape),
                    "data": row.reshape(-1).tolist(),
                }
            ]
        }


if __name__ == "__main__":
    api = ResNetAPI(max_batch_size=16, batch_timeout=0.005)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(
        host="127.0.0.1", port=int(sys.argv[2]), generate_client_file=False, log_level="warning"
    )
