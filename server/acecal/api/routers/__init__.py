"""One router per resource (listed in ``acecal.api.app.ROUTERS``); each calls the services of ``acecal.api.deps``."""
