"""Interactive inference: clicks in, masks out (numpy only; torch only behind the backends: ``backends.LocalBackend``
for SAM-Med3D, ``backends_sam3d_adapter`` for the 3DSAM-adapter).

``session`` (the public :class:`~SAM3DSegmentLib.inference.session.Session` API) drives ``predictor`` (a region's
embedding and decodes), ``growth`` (extension into neighbouring regions), ``compose`` (paste-back and merging of
the regions' logits), ``honour`` (click honouring) and ``history`` (cropped mask store, undo/redo), over
``regions`` (model-input grids), ``cache`` (embeddings) and ``backends`` (the model; ``options`` reads the
model's region spacing and limits from it). ``engine``, ``worker``,
``protocol`` and ``engine_process`` run a session for the Slicer module in a child process.
"""
