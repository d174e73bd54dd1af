"""Foundations shared by every package: ``geometry`` (Volume, RAS/LPS), ``boxes`` (voxel boxes), ``interp``
(linear interpolation on grids), ``types`` (Click, MaskUpdate), ``atomic`` (safe file writes). No torch, no
Slicer."""
