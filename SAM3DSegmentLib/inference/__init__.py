"""Interactive inference: clicks in, masks out (numpy only; torch only behind ``backends.LocalBackend``).

``session`` (the public :class:`~SAM3DSegmentLib.inference.session.Session` API) drives ``predictor`` (a region's
embedding and decodes), ``growth`` (extension into neighbouring regions), ``compose`` (paste-back and merging of
the regions' logits), ``honour`` (click honouring) and ``history`` (cropped mask store, undo/redo), over
``regions`` (model-input grids), ``cache`` (embeddings) and ``backends`` (the model). ``engine``, ``worker``,
``protocol`` and ``engine_process`` run a session for the Slicer module in a child process.
"""
