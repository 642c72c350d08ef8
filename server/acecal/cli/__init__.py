"""The ``acecal`` command line. Command modules register on ``acecal.cli.main.app``."""
