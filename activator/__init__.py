"""The activator: holds requests for a model scaled to zero until a replica is ready.

A data-plane proxy of its own, shipped beside the operator but not part of it: it imports
no kopf and none of the operator's reconciling code, and has its own extra
(``modelyard[activator]``: starlette, uvicorn on uvloop, aiohttp to the pods, the
Kubernetes client, the Prometheus client). The operator's side of scale-to-zero (finding
the activator, reading its wake signal) is :mod:`modelyard.operator.activation`.

While a ModelDeployment has no ready replica the operator points its stable Service at
the activator's pods (a selector-less Service and a managed EndpointSlice). Each request
arriving here names its model by the Host header, the Service's DNS name
(``NAME.NAMESPACE``, ``NAME.NAMESPACE.svc`` or ``NAME.NAMESPACE.svc.cluster.local``, any
port). The activator then:

1. looks up the model's ready runtime pods (label ``modelyard.dev/model-deployment=NAME``,
   Ready, not terminating, with an IP; port: the container port named ``http``);
2. if there is none, *holds* the request. Held requests are the
   ``modelyard_activator_waiting_requests`` gauge, which the operator's autoscaler reads as
   the signal to wake the model. The activator itself never scales anything. While
   requests wait for a model, one poll per model (every ``poll_seconds``, shared by all
   its waiters) lists the pods again;
3. forwards the request (method, path, query, buffered body, end-to-end headers) to one
   ready pod, round robin, and streams the answer back unchanged, status included, chunk
   by chunk as the pod sends it (a streamed completion arrives event by event). A pod
   that refuses the connection (it just went away) is dropped and another one tried, or
   the request waits again, within the same deadline. A client that disconnects stops
   its request: no longer held, or its connection to the pod closed (the pod stops);
4. answers ``503 {"error": "model NS/NAME has no ready replica after N s"}`` with
   ``Retry-After`` when a request has been held for its model's hold: ``timeout_seconds``
   (120 s) for a tensor model, ``generative_timeout_seconds`` (600 s) for a generative one
   (``spec.runtime.engine: vllm``, read from the ModelDeployment), whose cold start is
   minutes of loading weights and starting the engine; ``404`` for a Host that
   names no Service or a ModelDeployment that does not exist, ``413`` for a body above
   ``max_body_bytes`` and ``502`` when a pod fails after the request reached it (it is not
   retried: the model may have run it).

Two listeners: the proxy port (every path, routed by Host) and an admin port with
``/metrics`` (Prometheus text from the activator's own registry) and ``/healthz``, so no
model path is ever shadowed.

Run by ``modelyard activator`` (what the chart runs) or ``python -m modelyard.activator``;
flags mirror ``MODELYARD_ACTIVATOR_*`` variables (:mod:`.settings`). It needs ``list`` on
pods and ``get`` on ``modeldeployments.modelyard.dev`` in the model namespaces.

Modules, in the order a request meets them: :mod:`.settings` (flags and variables),
:mod:`.routing` (pure: which model a Host names, which headers travel, which pods are
ready, round robin), :mod:`.discovery` (the Kubernetes lookups in a worker thread, the
per-model cache, shared polls and holding), :mod:`.metrics`, :mod:`.proxy` (the two ASGI
apps) and :mod:`.server` (the two uvicorn listeners, signals, :func:`.server.main`).
Importing this package imports none of them.
"""
