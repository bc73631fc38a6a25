"""Photos in more than one model: which model keeps each, and the models without the others.

COLMAP's incremental mapper can leave small models that share photos with a larger one
(a pair it started from and then gave up on). A photo in two models would be mined as a
positive of one place and a negative of the same place, so ``reconstruct`` keeps each
photo in one model only, and ``ingest --shared-names largest`` does the same with models
it is given. The rule, one for both: a photo stays in the model with the most registered
photos (the first in input order on a tie) and leaves every other; a 3D point of a model
it leaves that is then seen by fewer than two photos is dropped. ``reconstruct`` also
drops the models left with fewer than its minimum of photos, and a photo of a dropped
model then stays in the next largest model that has it (:func:`keepers`).

Points seen by fewer than two distinct photos: ``reconstruct`` deletes them from every
model it keeps (:func:`deregister`), so that each point of its output is seen by two of
the model's photos at least (COLMAP's tracks may list a photo twice). ``ingest``
removes them from the models that lose a photo (:func:`drop_images`) and reads the
others as they are: its store counts the distinct photos seeing each point, and a
point seen by one photo adds no co-observation either way.

Two implementations of the one rule, each where its data is: :func:`deregister` on a
pycolmap reconstruction (``reconstruct`` writes COLMAP models that other tools read, so
they must be valid models), :func:`drop_images` on sfmpairs' own :class:`~.model.Model`
(``ingest`` reads models with its own readers and never builds a pycolmap one).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .model import Model


def by_size(names_per_model: list[list[str]]) -> list[int]:
    """The models' indices from the most photos to the fewest, the first in the list on a tie."""
    return sorted(range(len(names_per_model)), key=lambda k: (-len(names_per_model[k]), k))


def keepers(names_per_model: list[list[str]], min_size: int = 1) -> dict[str, int]:
    """Each photo name -> the index of the model that keeps it.

    The models go from the most photos to the fewest (the first in the list on a tie);
    each keeps the photos that no model before it kept, if they are at least
    ``min_size``; otherwise it keeps none, and its photos stay free for the smaller
    models after it (a photo seen by a dropped model and a smaller one is then kept by
    the smaller one, not lost). Names of dropped models that no other keeps are absent.
    """
    keeper: dict[str, int] = {}
    for k in by_size(names_per_model):
        free = [name for name in dict.fromkeys(names_per_model[k]) if name not in keeper]
        if len(free) >= min_size:
            keeper.update(dict.fromkeys(free, k))
    return keeper


def shared(names_per_model: list[list[str]]) -> dict[str, list[int]]:
    """The names in more than one model -> the models (indices) holding them."""
    where: dict[str, list[int]] = {}
    for k, names in enumerate(names_per_model):
        for name in names:
            where.setdefault(name, []).append(k)
    return {n: ks for n, ks in where.items() if len(ks) > 1}


def drop_images(model: Model, keep: np.ndarray) -> Model:
    """``model`` with the images where ``keep`` is False removed, their observations
    with them, and the 3D points then seen by fewer than two images removed too."""
    keep = np.asarray(keep, bool)
    counts = np.diff(model.indptr)
    row = np.repeat(np.arange(model.num_images), counts)
    obs = keep[row]
    seen_by = np.bincount(model.point[obs], minlength=model.num_points)  # one observation per (image, point)
    keep_point = seen_by >= 2
    obs &= keep_point[model.point]
    new_row = (np.cumsum(keep) - 1)[row[obs]]
    indptr = np.zeros(int(keep.sum()) + 1, np.int64)
    np.cumsum(np.bincount(new_row, minlength=len(indptr) - 1), out=indptr[1:])
    new_point = (np.cumsum(keep_point) - 1)[model.point[obs]].astype(np.int32)
    index = np.flatnonzero(keep)
    return replace(
        model,
        image_ids=model.image_ids[keep],
        names=[model.names[i] for i in index],
        camera_ids=model.camera_ids[keep],
        qvec=model.qvec[keep],
        tvec=model.tvec[keep],
        camera_model=[model.camera_model[i] for i in index],
        params=[model.params[i] for i in index],
        width=model.width[keep],
        height=model.height[keep],
        point_ids=model.point_ids[keep_point],
        xyz=model.xyz[keep_point],
        indptr=indptr,
        point=new_point,
        xy=model.xy[obs],
        track_length=np.bincount(new_point, minlength=int(keep_point.sum())).astype(np.int32),
    )


def deregister(rec, names: set[str]) -> int:
    """Deregister the images of ``rec`` (a pycolmap Reconstruction) named in ``names``,
    in place; COLMAP deletes their observations (and points left with one). Then every
    point seen by fewer than two distinct images (a track may list an image twice) is
    deleted, whether or not an image went: a point seen by one photo says nothing of
    which photos see the same place, and each model ``reconstruct`` writes has every
    point seen by two of its photos at least, not only the models that lost a photo.
    Returns the number of images deregistered."""
    gone = [img for img in rec.images.values() if img.name in names and img.has_pose]
    for img in gone:
        if rec.exists_frame(img.frame_id) and rec.frame(img.frame_id).has_pose:
            rec.deregister_frame(img.frame_id)
    lonely = [pid for pid, p in rec.points3D.items() if len({e.image_id for e in p.track.elements}) < 2]
    for pid in lonely:
        rec.delete_point3D(pid)
    return len(gone)
