"""One collection's class prototypes of one kind, kept up to date support by support.

Prototypes (ProtoNet class means) live in ``server.kernels.PrototypeMatrix`` rows keyed by the
store's class ids (``PrototypeMatrix.ids``; removal is a swap-remove, and the
``class id -> row`` map follows the moved row). A collection has two: ``"image"`` - the mean of
a class's image supports (each L2-normalised first for cosine, so the prototype is the
normalised mean of unit vectors; the plain mean for l2) - and ``"text"`` - the zero-shot class
weights, the normalised mean of the class's normalised text supports (open_clip's prompt
ensemble), always cosine as CLIP's zero-shot logits are. A class appears in a matrix only while
it has supports of that kind. Per class a float64 running sum and count are kept, so adding or
removing a support costs O(D). The caller normalises the vectors and holds the lock.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from server import kernels
from server.registry.records import FloatArray

__all__ = ["Prototypes"]


class Prototypes:
    """Per-class running sums/counts and the PrototypeMatrix rows they produce."""

    def __init__(self, dim: int, metric: kernels.Metric, dtype: kernels.Dtype) -> None:
        self.matrix = kernels.PrototypeMatrix(
            np.zeros((0, dim), np.float32), dtype=dtype, metric=metric, dim=dim
        )
        self.sums: dict[int, npt.NDArray[np.float64]] = {}
        self.counts: dict[int, int] = {}
        self.rows: dict[int, int] = {}

    def add(self, class_id: int, vecs: FloatArray) -> None:
        total = vecs.sum(axis=0, dtype=np.float64)
        if class_id in self.sums:
            self.sums[class_id] += total
            self.counts[class_id] += vecs.shape[0]
        else:
            self.sums[class_id] = total
            self.counts[class_id] = vecs.shape[0]
        self._write_row(class_id)

    def subtract(self, class_id: int, vecs: FloatArray) -> None:
        self.sums[class_id] -= vecs.sum(axis=0, dtype=np.float64)
        self.counts[class_id] -= vecs.shape[0]
        if self.counts[class_id] <= 0:
            self.drop(class_id)
        else:
            self._write_row(class_id)

    def drop(self, class_id: int) -> None:
        self.sums.pop(class_id, None)
        self.counts.pop(class_id, None)
        row = self.rows.pop(class_id, None)
        if row is None:
            return
        if self.matrix.remove(row) is not None:  # the last row moved into `row`
            self.rows[int(self.matrix.ids[row])] = row

    def _write_row(self, class_id: int) -> None:
        mean = (self.sums[class_id] / self.counts[class_id]).astype(np.float32)
        row = self.rows.get(class_id)
        if row is None:
            self.matrix.append(mean.reshape(1, -1), ids=[class_id])
            self.rows[class_id] = len(self.matrix) - 1
        else:
            self.matrix.update(row, mean)
