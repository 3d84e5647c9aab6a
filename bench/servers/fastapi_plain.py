"""Plain FastAPI endpoint, no batching: OIP v2 JSON parsed with orjson, model on the loop.

python bench/servers/fastapi_plain.py MODEL_PATH PORT
"""

from __future__ import annotations

import sys

import numpy as np
import orjson
import torch
import uvicorn
from common import load, log_batch
from fastapi import FastAPI, Request, Response

model = load(sys.argv[1])
app = FastAPI()


@app.post("/v2/models/resnet/infer")
async def infer(request: Request) -> Response:
    body = orjson.loads(await request.body())
    item = body["inputs"][0]
    x = torch.from_numpy(np.asarray(item["data"], dtype=np.float32).reshape(item["shape"]))
    with torch.inference_mode():
        y = model(x).numpy()
    log_batch(x.shape[0])
    answer = {
        "model_name": "resnet",
        "outputs": [
            {"name": "output", "datatype": "FP32", "shape": list(y.shape), "data": y.reshape(-1)}
        ],
    }
    return Response(
        orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
    )


uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
