"""One router per resource. ``acecal.api.app.ROUTERS`` lists them; later resources add theirs there."""
