"""lego-serve: continuous batching of brick tiles across requests.

    from lego_export.serve import ImageService, ServeConfig
    service = ImageService(ServeConfig(engines="engines/"))
    job = service.submit(service.parse({"class": 7, "num": 4, "steps": 18}))
    job.future.result().body     # PNG bytes: the images lego-run gives for the same options

scheduler  one real backend; merges the engine calls of every request in flight, tick by tick
service    jobs, admission (slots, bounded queue), cancellation, shutdown, encoding
validation the request body, checked like lego-run's options before anything is allocated
app, cli   the HTTP API (FastAPI) and the lego-serve command (uvicorn)
ray_app    the same API as a Ray Serve deployment with replicas autoscaled on queue depth
"""

from lego_export.serve.batcher import BatcherConfig, BatchingBackend, CallBatcher
from lego_export.serve.service import ImageService, ServeConfig
from lego_export.serve.validation import ImageRequest, Limits, RequestError

__all__ = [
    "BatchingBackend",
    "ImageRequest",
    "ImageService",
    "Limits",
    "RequestError",
    "CallBatcher",
    "BatcherConfig",
    "ServeConfig",
]
