"""ACECalibration: calibrated medical image segmentation with the mL1-ACE losses.

Packages and modules, one job each, top layer first (a layer imports only those below it; the order is an
import-linter contract, see ``docs/architecture.md``):

- ``acecal.cli``           the ``acecal`` command line (typer)
- ``acecal.api``           the FastAPI server: app factory, settings, auth, routers, schemas, the error mapping
- ``acecal.client``        the HTTP client (requests + numpy only: importable without torch; Slicer carries a copy)
- ``acecal.jobs``          fine-tuning jobs (service, scheduler, launcher, worker process, recovery) and evaluations
- ``acecal.training``      the training / fine-tuning engine, ``acecal evaluate``, ``acecal calibrate``
- ``acecal.inference``     bundle -> segmentation, confidence, uncertainty and flagged regions on the input grid
- ``acecal.calibration``   post-hoc calibrators (global / local temperature), fitting them for ACE, cross-fitting
- ``acecal.losses``        hard/soft-binned L1 average calibration error losses and their combinations (torch, monai)
- ``acecal.metrics``       ECE/ACE/MCE, Dice, streaming accumulation over a dataset, the ACE floor, error detection
- ``acecal.plots``         reliability diagrams and dataset reliability histograms (matplotlib)
- ``acecal.storage``       the server's durable state: SQLite db, stored datasets, results, evaluation reports;
  ``acecal.storage.files`` (atomic writes, stdlib only) is the base every layer writes files with
- ``acecal.data``          image headers, SimpleITK I/O, datasets and the MONAI transform chains
- ``acecal.bundles``       self-describing model bundles, model cards and the model registry
- ``acecal.networks``      the two-head SegResNet and the one head split
- ``acecal.binning``       the calibration bins, written once for losses and metrics
- ``acecal.tensor_checks`` the argument checks of losses and metrics
- ``acecal.protocol``      the wire format (names and records), defined once
- ``acecal.nrrd``          numpy-only NRRD codec
- ``acecal.formatting``    numbers as reports and the CLI print them
- ``acecal.geometry``      Grid and the one LPS <-> RAS conversion
- ``acecal.errors``        the one exception hierarchy

Importing ``acecal`` itself is cheap and never imports torch.
"""

__version__ = "0.1.0"
