"""acecal.api: the FastAPI inference server (``acecal serve``; reference in ``docs/api.md``).

- :mod:`.app`        ``create_app(settings)``: the factory; the list of routers
- :mod:`.settings`   ``Settings`` (pydantic-settings, ``ACECAL_*`` environment variables)
- :mod:`.deps`       ``ServerState`` (registry, predictor cache, device queue, result store) and dependencies
- :mod:`.auth`       bearer API key, constant-time comparison
- :mod:`.errors`     the one mapping from exceptions to ``{"error", "detail"}`` replies
- :mod:`.schemas`    pydantic models of every request and response
- :mod:`.queue`      the bounded device queue (503 + Retry-After when full)
- :mod:`.store`      inference results on disk, with expiry
- :mod:`.middleware` the upload size cap
- :mod:`.routers`    one router per resource: health, models, infer, results (and later resources)
"""
