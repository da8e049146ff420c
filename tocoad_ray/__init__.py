"""tocoad-ray: ToCoAD, ReConPatch and PatchCore industrial anomaly detection, distributed with Ray.

Folders: ``data`` (readers, preprocessing), ``models`` (feature extractor F and the networks),
``bank`` (PatchCore memory bank M), ``synth`` (anomaly generator G), ``train`` (stages I/II,
ReConPatch), ``metrics``; ``pipeline`` glues them into fit/evaluate/predict; ``cli`` is ``tocoad``.
"""
__version__ = "0.1.0"
