"""acecal.api: the HTTP layer of the server (``acecal serve``; reference in ``docs/api.md``).

Routers and HTTP concerns only; the work is done by :mod:`acecal.inference`, :mod:`acecal.jobs` and
:mod:`acecal.storage` (arrows point one way: this package imports them, never the reverse).

- :mod:`.app`        ``create_app(settings)``: the factory; the list of routers
- :mod:`.services`   ``AppServices``: the services one app uses, built once (``build_services``)
- :mod:`.deps`       the services as ``Annotated`` dependencies (``ServicesDep``, ``JobsDep``, ``DatasetsDep``, ...)
- :mod:`.settings`   ``Settings`` (pydantic-settings, ``ACECAL_*`` environment variables)
- :mod:`.auth`       bearer API key, checked in ASGI middleware before any body is read
- :mod:`.middleware` the request size caps
- :mod:`.uploads`    multipart uploads streamed into the data directory
- :mod:`.errors`     the one mapping from exceptions to ``{"error", "detail"}`` replies
- :mod:`.schemas`, :mod:`.finetune_schemas`  pydantic models of every request and response
- :mod:`.queue`      the bounded device queue (503 + Retry-After when full)
- :mod:`.routers`    one router per resource: health, models, infer, results, datasets, jobs, evaluate
"""
