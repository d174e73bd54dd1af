"""A segmentation's binary labelmaps seen on a volume's voxel lattice (world space is the contract).

A labelmap may index the volume's lattice with another origin (a whole-voxel shift); any other geometry
(spacing, axes, a sub-voxel shift, a non-linear transform between the two nodes) is refused with
:class:`~SAM3DSegmentLib.core.geometry.GeometryError` before anything changes.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ..core.geometry import GeometryError
from .volumes import numpy_to_vtk_matrix, parent_to_world, scalars_view, vtk_matrix_to_numpy


def volume_lattice_in_segmentation(volume_node, segmentation_node) -> np.ndarray:
    """4x4 matrix: volume voxel (i, j, k) -> the segmentation's local coordinates (the frame its labelmaps'
    ImageToWorld matrices are in), through the transforms that separate the two nodes (world space is the
    contract). GeometryError when a non-linear transform separates them."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ijk_to_local = vtk_matrix_to_numpy(m)
    if volume_node.GetParentTransformNode() is segmentation_node.GetParentTransformNode():
        return ijk_to_local
    return np.linalg.inv(parent_to_world(segmentation_node)) @ parent_to_world(volume_node) @ ijk_to_local


def check_segmentation_geometry(segmentation_node, volume_node) -> None:
    """GeometryError (nothing is changed) unless every non-empty labelmap of the segmentation lies on the volume's
    voxel grid in world space (same axes and spacing, origin shifted by whole voxels), whatever transforms the
    two nodes are under."""
    import slicer

    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        return
    if segmentation.GetSourceRepresentationName() != \
            slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName():
        raise GeometryError(f"segmentation '{segmentation_node.GetName()}' is not stored as a binary labelmap; in "
                            "the Segmentations module set its source representation to 'Binary labelmap', or "
                            "choose 'Create new segmentation'")
    lattice = volume_lattice_in_segmentation(volume_node, segmentation_node)
    for n in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(n)
        layer = Layer(segmentation_node.GetBinaryLabelmapInternalRepresentation(sid), lattice,
                       f"segment '{segmentation.GetSegment(sid).GetName()}' of '{segmentation_node.GetName()}'")
        if not layer.empty:
            layer.offset()


class Layer:
    """One (possibly shared) binary labelmap seen on the volume's voxel lattice.

    The labelmap may index the same lattice with another origin (a whole-voxel shift ``offset``: volume ijk =
    labelmap ijk + offset); any other geometry (spacing, axes, sub-voxel shift) is refused with a clear error.
    """

    def __init__(self, image, lattice: np.ndarray, what: str):
        self.image, self.lattice, self.what = image, lattice, what
        self._offset: Optional[np.ndarray] = None

    @property
    def empty(self) -> bool:
        e = self.image.GetExtent()
        return e[0] > e[1] or e[2] > e[3] or e[4] > e[5] or self.image.GetPointData().GetScalars() is None

    def offset(self) -> np.ndarray:
        if self._offset is None:
            import vtk

            m = vtk.vtkMatrix4x4()
            self.image.GetImageToWorldMatrix(m)
            rel = np.linalg.inv(self.lattice) @ vtk_matrix_to_numpy(m)
            t = rel[:3, 3]
            if not (np.allclose(rel[:3, :3], np.eye(3), atol=1e-4) and np.allclose(t, np.round(t), atol=1e-3)):
                raise GeometryError(
                    f"{self.what} is stored on another voxel grid than this volume in world space (it was made "
                    "for another image, or for this one before it was moved); nothing was changed. Choose "
                    "'Create new segmentation' in the Segmentation selector, or choose the volume it was made for")
            self._offset = np.round(t).astype(int)
        return self._offset

    def view(self) -> np.ndarray:
        return scalars_view(self.image)

    def box_slices(self, box_ijk: Tuple[Tuple[int, int], ...]):
        """Slices of this layer's [k, j, i] array for a volume box ((i0, i1), (j0, j1), (k0, k1)) (half-open) and
        the matching slices of the box: the overlap only; ``(None, None)`` when they do not overlap."""
        if self.empty:
            return None, None
        e, t = self.image.GetExtent(), self.offset()
        arr_sl, box_sl = [], []
        for axis in (2, 1, 0):  # k, j, i
            lo, hi = box_ijk[axis]
            elo, ehi = e[2 * axis] + t[axis], e[2 * axis + 1] + 1 + t[axis]
            a, b = max(lo, elo), min(hi, ehi)
            if a >= b:
                return None, None
            arr_sl.append(slice(a - elo, b - elo))
            box_sl.append(slice(a - lo, b - lo))
        return tuple(arr_sl), tuple(box_sl)

    def read_box(self, box_ijk, label: int) -> np.ndarray:
        shape = tuple(box_ijk[a][1] - box_ijk[a][0] for a in (2, 1, 0))
        out = np.zeros(shape, dtype=bool)
        arr_sl, box_sl = self.box_slices(box_ijk)
        if arr_sl is not None:
            out[box_sl] = self.view()[arr_sl] == label
        return out

    def grow_to_contain(self, box_ijk) -> None:
        """Extend the labelmap IN PLACE (the same object: segments sharing the layer keep pointing at it) so
        that its extent holds the box; an empty labelmap takes the volume's lattice."""
        import vtk
        import slicer

        if self.empty:
            matrix, t, old, scalar_type = self.lattice, np.zeros(3, int), None, vtk.VTK_UNSIGNED_CHAR
            want = [v for a in range(3) for v in (box_ijk[a][0], box_ijk[a][1] - 1)]
        else:
            t, e = self.offset(), list(self.image.GetExtent())
            want = [v for a in range(3) for v in (min(box_ijk[a][0] - t[a], e[2 * a]),
                                                   max(box_ijk[a][1] - 1 - t[a], e[2 * a + 1]))]
            if want == e:
                return
            m = vtk.vtkMatrix4x4()
            self.image.GetImageToWorldMatrix(m)
            matrix = vtk_matrix_to_numpy(m)
            old, scalar_type = np.array(self.view()), self.image.GetPointData().GetScalars().GetDataType()
        grown = slicer.vtkOrientedImageData()
        grown.SetExtent(want)
        grown.SetImageToWorldMatrix(numpy_to_vtk_matrix(matrix))
        grown.AllocateScalars(scalar_type, 1)
        arr = scalars_view(grown)
        arr[...] = 0
        if old is not None and old.size:
            arr[e[4] - want[4]:e[5] - want[4] + 1, e[2] - want[2]:e[3] - want[2] + 1,
                e[0] - want[0]:e[1] - want[0] + 1] = old
        self.image.ShallowCopy(grown)
        self.image.SetImageToWorldMatrix(numpy_to_vtk_matrix(matrix))
        self._offset = t


def mark_modified(image) -> None:
    scalars = image.GetPointData().GetScalars()
    if scalars is not None:
        scalars.Modified()
    image.Modified()
