"""The one package where SAM3DSegmentLib touches MRML (3D Slicer's scene), split by job:

* :mod:`.volumes`: volume nodes as ``Volume`` objects (world / parent transforms), VTK <-> numpy plumbing;
* :mod:`.markups`: the include / exclude prompt points, their observers, points outside the volume;
* :mod:`.target`: the target segmentation and segment, Segment Editor settings, the module's segment lock;
* :mod:`.layers`: a segmentation's labelmaps seen on the volume's voxel lattice;
* :mod:`.labelmap`: writing masks into segments and reading segments;
* :mod:`.history`: undo/redo of the voxels in step with the engine, the write-back of engine results;
* :mod:`.engine_link`: the module's link to the engine (jobs queued and polled on the GUI thread);
* :mod:`.remote_link`: the Local / Remote panel (remote settings in Slicer's settings, connection test, messages);
* :mod:`.export`: ``.seg.nrrd``, NIfTI and DICOM SEG export;
* :mod:`.dependencies`: installing torch and slicerio inside Slicer.

The names the module (``SAM3DSegment/SAM3DSegment.py``), the tests and the benchmarks use are re-exported here:
``from SAM3DSegmentLib import slicer as sb``.

Everything here runs on Slicer's main (GUI) thread: MRML and VTK objects are not thread-safe. No other package
of the library imports this one, and ``slicer`` / ``vtk`` are imported inside the functions, so
``import SAM3DSegmentLib`` stays Slicer-free. The same code runs in Slicer and, for tests and benchmarks, on the
Qt-free PyPI wheel ``slicer-core`` (pass your own ``vtkMRMLScene``).

Coordinate frames (see :mod:`SAM3DSegmentLib.core.geometry`):

* Voxel arrays are ``[k, j, i]`` (``slicer.util.arrayFromVolume`` order); boxes are ``(k, j, i)`` slices.
* A node's ``IJKToRAS`` is LOCAL: it ignores parent transforms. Markups control points are read in WORLD
  coordinates. :func:`volume_from_node` folds a linear parent transform into ``ijk_to_ras`` (``frame="world"``,
  the default) and :func:`clicks_from_markups` returns WORLD points by default, so a click maps to the voxel
  the user saw under the mouse. ``frame="volume"`` gives both in the volume's local frame instead. Use the
  same frame for both.
* Segment voxels are written on the volume's voxel lattice as seen from the segmentation, through whatever
  linear transforms separate the two nodes (world space is the contract). A user's segmentation is never
  re-parented or resampled; one whose labelmaps lie on another grid is refused before anything changes. A
  segmentation the module creates is put under the volume's parent transform.
"""
from .dependencies import ensure_dependencies
from .engine_link import EngineLink
from .export import export_dicom_seg, export_nifti, export_seg_nrrd, export_segmentation
from .history import SegmentHistory, apply_engine_result, write_job_result
from .labelmap import MASK_MODES, OVERWRITE_MODES, read_segment, remove_temporary_node, write_mask_to_segment
from .layers import check_segmentation_geometry, volume_lattice_in_segmentation
from .markups import (ORDER_ATTRIBUTE, UNUSED_POINT_COLOR, MarkupsObserver, PlaceModeObserver, clicks_from_markups,
                      defined_point_ids, place_buttons_state, prompt_nodes, record_placement, reject_points_outside,
                      show_clicks)
from .remote_link import RemotePanel, failure_text
from .target import (LOCK_TAG, TargetSegment, editor_settings, ensure_segment, is_segment_locked, prepare_target,
                     segmentations_logic, set_segment_locked)
from .volumes import (numpy_to_vtk_matrix, parent_to_world, scalars_view, volume_from_node, volume_geometry,
                      volume_token, vtk_matrix_to_numpy)

__all__ = [
    "ensure_dependencies", "EngineLink", "RemotePanel", "failure_text", "export_dicom_seg", "export_nifti",
    "export_seg_nrrd", "export_segmentation",
    "SegmentHistory", "apply_engine_result", "write_job_result", "MASK_MODES", "OVERWRITE_MODES", "read_segment",
    "remove_temporary_node", "write_mask_to_segment", "check_segmentation_geometry",
    "volume_lattice_in_segmentation", "ORDER_ATTRIBUTE", "UNUSED_POINT_COLOR", "MarkupsObserver",
    "PlaceModeObserver", "clicks_from_markups", "defined_point_ids", "place_buttons_state", "prompt_nodes",
    "record_placement", "reject_points_outside", "show_clicks", "LOCK_TAG", "TargetSegment", "editor_settings",
    "ensure_segment", "is_segment_locked", "prepare_target", "segmentations_logic", "set_segment_locked",
    "numpy_to_vtk_matrix", "parent_to_world", "scalars_view", "volume_from_node", "volume_geometry", "volume_token",
    "vtk_matrix_to_numpy",
]
