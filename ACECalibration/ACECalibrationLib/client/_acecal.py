# Generated from server/acecal/__init__.py by ACECalibration/CMake/generate_light_client.py: edit the source.
"""ACECalibration: calibrated medical image segmentation with the mL1-ACE losses.

Sub-packages, each with one job (arrows point one way):

- ``acecal.losses``      hard/soft binned L1 average calibration error losses (torch, monai)
- ``acecal.metrics``     ECE/ACE/MCE, Dice, streaming accumulation over a dataset (torch)
- ``acecal.plots``       reliability diagrams and dataset reliability histograms (matplotlib)
- ``acecal.calibration`` temperature scaling
- ``acecal.bundles``     self-describing model bundles and the model registry
- ``acecal.data``        image I/O, datasets and the MONAI transform chains shared by training and inference
- ``acecal.training``    the training / fine-tuning engine
- ``acecal.inference``   bundle -> segmentation, confidence, uncertainty and flagged regions on the input grid
- ``acecal.api``         the FastAPI server
- ``acecal.client``      the HTTP client (requests only: importable without torch)
- ``acecal.cli``         the ``acecal`` command line

Importing ``acecal`` itself is cheap and never imports torch.
"""

__version__ = "0.1.0"
