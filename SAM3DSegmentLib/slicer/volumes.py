"""Scalar volume nodes as :class:`~SAM3DSegmentLib.core.geometry.Volume` objects, and the VTK <-> numpy plumbing
the other modules of this package share (4x4 matrices, image scalars, parent transforms).

A node's ``IJKToRAS`` is LOCAL: it ignores parent transforms. :func:`volume_from_node` folds a linear parent
transform into ``ijk_to_ras`` (``frame="world"``, the default) or keeps the local frame (``frame="volume"``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..core.geometry import GeometryError, Volume


def vtk_matrix_to_numpy(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def numpy_to_vtk_matrix(a: np.ndarray):
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def scalars_view(image) -> np.ndarray:
    """Writable [k, j, i] numpy view of a vtkImageData's scalars (memory owned by VTK: never reallocate)."""
    from vtk.util import numpy_support

    dims = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    if scalars is None or min(dims) <= 0:
        return np.zeros((0, 0, 0), dtype=np.uint8)
    return numpy_support.vtk_to_numpy(scalars).reshape(tuple(reversed(dims)))


def parent_to_world(node) -> np.ndarray:
    """4x4 local->world matrix of a transformable node; GeometryError for non-linear parent transforms."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise GeometryError(
            f"'{node.GetName()}' is under a non-linear (warping) transform '{parent.GetName()}'. "
            "Harden the transform first (Data module: right-click the node -> 'Harden transform'), "
            "or remove it")
    import vtk

    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return vtk_matrix_to_numpy(m)


def check_frame(frame: str) -> None:
    if frame not in ("world", "volume"):
        raise ValueError(f"frame must be 'world' or 'volume', got {frame!r}")


def volume_from_node(volume_node, frame: str = "world") -> Volume:
    """A copy of a scalar volume node as a ``geometry.Volume``.

    ``array`` is a copy ([k, j, i]), safe to hand to a worker thread. ``ijk_to_ras`` is the node's IJKToRAS,
    preceded (``frame="world"``) by its linear parent transform. ``meta``: ``node_id``, ``mtime`` (image data
    MTime: with node id and ``ijk_to_ras`` the embedding-cache key), ``frame``, ``name``, and
    ``dicom_series_uid`` / ``dicom_instance_uids`` when the volume was loaded from DICOM.
    """
    check_frame(frame)
    if volume_node is None:
        raise ValueError("no volume selected: choose the CT volume to segment")
    if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise GeometryError(f"'{volume_node.GetName()}' is a {volume_node.GetClassName()}, not a scalar (CT) "
                            "volume; select a grey-level volume")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise GeometryError(f"volume '{volume_node.GetName()}' has no voxels loaded")
    if image.GetNumberOfScalarComponents() != 1:
        raise GeometryError(f"volume '{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} "
                            "components per voxel; convert it to a scalar volume (Vector to Scalar Volume module)")
    array = np.array(scalars_view(image))  # copy
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ijk_to_ras = vtk_matrix_to_numpy(m)
    if frame == "world":
        ijk_to_ras = parent_to_world(volume_node) @ ijk_to_ras
    meta = {"node_id": volume_node.GetID(), "name": volume_node.GetName(), "mtime": int(image.GetMTime()),
            "frame": frame}
    uids = volume_node.GetAttribute("DICOM.instanceUIDs")
    if uids:
        meta["dicom_instance_uids"] = uids.split()
        series = _dicom_series_uid(volume_node)
        if series:
            meta["dicom_series_uid"] = series
    return Volume(array, ijk_to_ras, meta)


def _dicom_series_uid(volume_node) -> Optional[str]:
    """Series instance UID from the subject hierarchy (Slicer GUI) or a node attribute; None if unknown."""
    uid = volume_node.GetAttribute("DICOM.SeriesInstanceUID")
    if uid:
        return uid
    try:
        import slicer

        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(volume_node.GetScene())
        item = sh.GetItemByDataNode(volume_node)
        return sh.GetItemUID(item, "DICOM") or None
    except Exception:  # noqa: BLE001 - subject hierarchy absent (slicer-core) or no DICOM UID
        return None


def volume_geometry(volume_node) -> Volume:
    """The volume's grid in WORLD space without copying its voxels (``array`` is a read-only zero view of the
    right shape): for point-inside tests on the GUI thread."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise ValueError("no volume selected: choose the CT volume to segment")
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    i, j, k = volume_node.GetImageData().GetDimensions()
    return Volume(np.broadcast_to(np.uint8(0), (k, j, i)), parent_to_world(volume_node) @ vtk_matrix_to_numpy(m),
                  {"node_id": volume_node.GetID(), "name": volume_node.GetName()})


def volume_token(volume_node) -> tuple:
    """What the engine's copy of the volume depends on: ``(node id, image data MTime, world IJKToRAS as 16
    floats)``. A changed token means the volume must be sent again: new voxels, or a new grid in world space
    (spacing, origin or axes edited in the Volumes module, a parent transform added, moved or removed).
    GeometryError under a non-linear parent transform."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    world = parent_to_world(volume_node) @ vtk_matrix_to_numpy(m)
    return (volume_node.GetID(), int(volume_node.GetImageData().GetMTime()),
            tuple(float(v) for v in world.reshape(-1)))
