"""SAM3DSegmentLib: the Slicer-free library behind the SAM3DSegment extension.

Importing this package (or any of its light modules) never imports torch, Slicer or VTK; modules that
need torch import it inside functions. See README.md, "Architecture".
"""
__version__ = "0.1.0"
