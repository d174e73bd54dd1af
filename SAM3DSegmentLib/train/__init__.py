"""Headless training of SAM-Med3D-family models.

Never imports Slicer. torch is imported lazily (importing this package is light). Library use:
``from SAM3DSegmentLib.train.loop import train``; config schema in :mod:`.config`. The command line
(``sam3d train`` and ``python -m SAM3DSegmentLib.train``) is :mod:`SAM3DSegmentLib.cli.train`. See
docs/training.md.
"""
