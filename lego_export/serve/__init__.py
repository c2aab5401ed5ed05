"""lego-serve: continuous batching of brick tiles across requests.

    from lego_export.serve import ImageService, ServeConfig
    service = ImageService(ServeConfig(engines="engines/"))
    job = service.submit(service.parse({"class": 7, "num": 4, "steps": 18}))
    job.future.result().body     # PNG bytes: the images lego-run gives for the same options

config     ServeConfig: every setting, declared once (lego-serve's options, Ray Serve's keys)
policy     admission and order: one urgency rule, one model of the machine (pure functions)
cost       what a request costs, from startup measurements, kept current
batcher    one real backend; runs the engine calls of every request in flight, tick by tick
jobs       each request's lifecycle and where jobs are kept
service    wires them together: admission, slots, deadlines, shutdown, encoding
validation the request body, checked like lego-run's options before anything is allocated
app, cli   the HTTP API (FastAPI) and the lego-serve command (uvicorn)
ray_app    the same API as a Ray Serve deployment with replicas autoscaled on queue depth
"""

from lego_export.serve.batcher import BatchingBackend, CallBatcher
from lego_export.serve.config import ServeConfig
from lego_export.serve.service import ImageService
from lego_export.serve.validation import ImageRequest, Limits, RequestError

__all__ = ["BatchingBackend", "CallBatcher", "ImageRequest", "ImageService", "Limits", "RequestError", "ServeConfig"]
