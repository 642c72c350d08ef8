"""ACECalibrationLib: everything of the Slicer module that is not GUI.

Importable in plain Python with ``slicer-core`` (MRML classes from ``slicer_core``) as well as inside 3D Slicer; it
never needs ``slicer.mrmlScene``, ``slicer.modules`` or Qt. Modules:

- :mod:`.nodes`: volume node <-> numpy (z, y, x) + :class:`acecal.geometry.Grid`, exact geometry;
- :mod:`.segmentation`: segmentation node from a label map, one segment per model label, plus ``Uncertain``;
- :mod:`.display`: colours, the confidence colour table, overlay and outline settings;
- :mod:`.regions`: the uncertain-regions table and navigation between regions;
- :mod:`.worker`: a Qt-free background task with progress and cancel;
- :mod:`.settings`: server URL history (the API key is never stored);
- :mod:`.logic`: ``run_segmentation`` and its non-blocking pieces, through :class:`acecal.client.ACEClient`.
"""

__version__ = "0.1.0"
