"""Image I/O, datasets and the MONAI transform chains shared by training and inference.

Import the submodules directly (``acecal.data.io``, ``acecal.data.transforms``): they pull in SimpleITK and MONAI.
"""
