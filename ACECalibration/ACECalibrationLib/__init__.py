"""ACECalibrationLib: everything of the Slicer module that is not GUI.

Importable in plain Python with ``slicer-core`` (MRML classes from ``slicer_core``) as well as inside 3D Slicer; it
never needs ``slicer.mrmlScene``, ``slicer.modules`` or Qt. Modules:

- :mod:`.client`: the extension's own copy of the light ``acecal`` client (generated from ``server/acecal`` by
  ``ACECalibration/CMake/generate_light_client.py``; numpy + requests only, Python 3.9+), with the wire protocol
  (:mod:`.client.protocol`: every key and record of the server's replies);
- :mod:`.controller`: the module's state machine (connect, models, segment, cancel, scene close, review,
  fine-tune, evaluation); the widget only binds Qt signals to it;
- :mod:`.logic`: ``run_segmentation`` and its pieces (input copy, inference, result nodes);
- :mod:`.nodes`: volume node <-> numpy (z, y, x) + :class:`~.client.geometry.Grid`, exact geometry;
- :mod:`.segmentation`: the anatomy segmentation (one segment per model label) and the ``Uncertain`` segmentation;
- :mod:`.display`: colours, Slicer's Viridis table, overlay and outline settings, which views to touch;
- :mod:`.regions`, :mod:`.review`: the uncertain-regions table (the review worklist) and navigation;
- :mod:`.stats`: per-segment volume and mean confidence; :mod:`.terminology`: standard codes on segments;
- :mod:`.finetune`: training pairs from the scene, fine-tuning and per-case evaluation;
- :mod:`.worker`, :mod:`.transport`: a Qt-free background task, and a session whose requests Cancel can abort;
- :mod:`.settings`: server URL history and upload consent (the API key is never stored);
- :mod:`.sampledata`: the sample hippocampus case shipped with the extension.
"""

import sys

__version__ = "0.2.0"


def unload() -> list:
    """Forget every ``ACECalibrationLib`` module, so the next import reads the files again (the widget's *Reload*).

    Returns the names removed. Objects made before keep their old classes; the reloaded widget makes new ones.
    """
    names = sorted(n for n in sys.modules if n == __name__ or n.startswith(__name__ + "."))
    for name in names:
        del sys.modules[name]
    return names
