"""KServe Python model server (v2 protocol; it has no in-process batching).

python bench/servers/kserve_server.py MODEL_PATH PORT
"""

from __future__ import annotations

import sys
import uuid

import torch
from common import load, log_batch
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class ResNet(Model):  # type: ignore[misc]
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        self.model = load(self.path)
        self.ready = True
        return True

    def predict(self, payload: InferRequest, headers=None, response_headers=None):  # type: ignore[no-untyped-def]
        x = torch.from_numpy(payload.inputs[0].as_numpy())
        with torch.inference_mode():
            y = self.model(x).numpy()
        log_batch(x.shape[0])
        binary = bool((payload.parameters or {}).get("binary_data_output", False))
        output = InferOutput(name="output", shape=list(y.shape), datatype="FP32")
        output.set_data_from_numpy(y, binary_data=binary)
        return InferResponse(
            response_id=payload.id or str(uuid.uuid4()),
            model_name=self.name,
            infer_outputs=[output],
            use_binary_outputs=binary,
        )


if __name__ == "__main__":
    ModelServer(
        http_port=int(sys.argv[2]),
        grpc_port=int(sys.argv[3]),
        workers=1,
        enable_grpc=False,
        enable_latency_logging=False,
    ).start([ResNet("resnet", sys.argv[1])])
