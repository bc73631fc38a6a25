"""``sfmpairs synth``: a synthetic world, rendered, with exact COLMAP models.

Each cluster is a building corner: two textured walls meeting at a right angle, with a
texture of its own (procedural: a palette, smooth noise, a grid of windows, a few
blobs), seen by cameras at varied distances, angles and focal lengths, under varied
lighting, often of only part of the walls. Photos are rendered by exact ray casting; the
COLMAP model (written with pycolmap) holds the cameras, their poses, 3D points on the
walls and, as observations, every visible projection (a z-buffer decides visibility).

Frame of a cluster: y up, wall A in the plane z = 0 (x in [0, LA], y in [0, H]), wall B
in the plane x = 0 (z in [0, LB]), cameras in front of both (x > 0, z > 0). COLMAP
cameras look along +z with y down.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TEXTURE_PX_PER_UNIT = 96


def make_texture(rng, width_units: float, height_units: float) -> np.ndarray:
    """A procedural facade texture (H, W, 3) float in [0, 1]."""
    w, h = int(width_units * TEXTURE_PX_PER_UNIT), int(height_units * TEXTURE_PX_PER_UNIT)
    palette = rng.uniform(0.05, 0.95, (3, 3))
    # smooth noise: a few octaves of upsampled random grids
    noise = np.zeros((h, w))
    for cells in (4, 9, 23):
        g = rng.normal(size=(cells + 1, cells + 1))
        yy = np.linspace(0, cells, h)[:, None]
        xx = np.linspace(0, cells, w)[None, :]
        y0, x0 = np.minimum(yy.astype(int), cells - 1), np.minimum(xx.astype(int), cells - 1)
        fy, fx = yy - y0, xx - x0
        noise += (
            (g[y0, x0] * (1 - fx) + g[y0, x0 + 1] * fx) * (1 - fy)
            + (g[y0 + 1, x0] * (1 - fx) + g[y0 + 1, x0 + 1] * fx) * fy
        ) / cells**0.5
    noise = (noise - noise.min()) / (np.ptp(noise) + 1e-9)
    tex = palette[0] * (1 - noise[..., None]) + palette[1] * noise[..., None]
    # windows: a grid of rectangles in the third colour, with a frame
    sx, sy = rng.uniform(0.3, 0.8), rng.uniform(0.4, 0.9)  # spacing, units
    fill_x, fill_y = rng.uniform(0.35, 0.7), rng.uniform(0.35, 0.7)
    u = np.arange(w) / TEXTURE_PX_PER_UNIT
    v = np.arange(h) / TEXTURE_PX_PER_UNIT
    inside = ((u[None, :] % sx) / sx < fill_x) & ((v[:, None] % sy) / sy < fill_y)
    tex[inside] = 0.55 * palette[2] + 0.45 * tex[inside]
    # blobs
    for _ in range(rng.integers(3, 8)):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.25) * TEXTURE_PX_PER_UNIT
        d2 = (np.arange(w)[None, :] - cx) ** 2 + (np.arange(h)[:, None] - cy) ** 2
        tex[d2 < r * r] = rng.uniform(0, 1, 3)
    # small marks everywhere (posters, stains, bricks): distinct local features, so that
    # feature matching (sfmpairs reconstruct) can register the photos
    for _ in range(int(w * h / 400)):
        x0, y0 = rng.integers(0, w - 4), rng.integers(0, h - 4)
        dx, dy = rng.integers(4, 16), rng.integers(4, 16)
        tex[y0 : y0 + dy, x0 : x0 + dx] = rng.choice([0.0, 1.0], 3) * rng.uniform(0.6, 1.0)
    return np.clip(tex + rng.normal(0, 0.02, tex.shape), 0, 1)


def _look_at(centre, target, roll_rng):
    z = target - centre
    z /= np.linalg.norm(z)
    down = np.array([0.0, -1.0, 0.0])
    x = np.cross(down, z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])  # rows: camera axes in world coordinates (cam_from_world)
    a = roll_rng.normal(0, 0.03)
    roll = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return roll @ R


def sample_cameras(rng, n: int, walls: dict, width: int, height: int):
    """Poses (R, t) and focal lengths of n cameras in front of the walls."""
    LA, LB, H = walls["LA"], walls["LB"], walls["H"]
    cams = []
    for _ in range(n):
        on_a = rng.random() < LA / (LA + LB)
        s = rng.uniform(0.1, 0.9)
        target = (
            np.array([s * LA, rng.uniform(0.25, 0.75) * H, 0.0])
            if on_a
            else np.array([0.0, rng.uniform(0.25, 0.75) * H, s * LB])
        )
        ang = rng.uniform(np.deg2rad(10), np.deg2rad(80))  # direction in the x-z quadrant
        dist = rng.uniform(0.5, 2.2) * H
        direction = np.array([np.cos(ang), 0.0, np.sin(ang)])
        centre = target + dist * direction + np.array([0.0, rng.uniform(-0.2, 0.3) * H, 0.0])
        centre[0], centre[2] = max(centre[0], 0.3), max(centre[2], 0.3)
        R = _look_at(centre, target, rng)
        f = rng.uniform(0.8, 1.6) * width
        cams.append((R, -R @ centre, f))
    return cams


def _ray_hits(C, D, walls):
    """Nearest wall hit of rays from C along D (N, 3): (t, wall id 0/1 or -1, u, v), with
    u the texture column in units (wall A: x; wall B: LA + z) and v the height."""
    LA, LB, H = walls["LA"], walls["LB"], walls["H"]
    n = len(D)
    best_t = np.full(n, np.inf)
    wall = np.full(n, -1)
    u = np.zeros(n)
    v = np.zeros(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        for wid, axis, length, offset in ((0, 2, LA, 0.0), (1, 0, LB, LA)):
            t = -C[axis] / D[:, axis]
            P = C + t[:, None] * D
            along = P[:, 0] if wid == 0 else P[:, 2]
            ok = (t > 1e-6) & (along >= 0) & (along <= length) & (P[:, 1] >= 0) & (P[:, 1] <= H) & (t < best_t)
            best_t[ok], wall[ok] = t[ok], wid
            u[ok], v[ok] = offset + along[ok], P[ok, 1]
    return best_t, wall, u, v


def render(R, t, f, width, height, walls, texture, rng, supersample: int = 2):
    """(uint8 image (H, W, 3), depth map (H, W) along the optical axis, inf on sky)."""
    W2, H2 = width * supersample, height * supersample
    C = -R.T @ t
    xs = (np.arange(W2) + 0.5) / supersample - width / 2
    ys = (np.arange(H2) + 0.5) / supersample - height / 2
    dirs_cam = np.stack(np.broadcast_arrays(xs[None, :], ys[:, None], np.full((H2, W2), f)), -1).reshape(-1, 3)
    dirs = dirs_cam @ R  # to world
    tt, wall, u, v = _ray_hits(C, dirs, walls)
    th, tw = texture.shape[:2]
    px = np.clip(u * TEXTURE_PX_PER_UNIT, 0, tw - 1.001)
    py = np.clip((walls["H"] - v) * TEXTURE_PX_PER_UNIT, 0, th - 1.001)
    x0, y0 = px.astype(int), py.astype(int)
    fx, fy = (px - x0)[:, None], (py - y0)[:, None]
    col = (texture[y0, x0] * (1 - fx) + texture[y0, x0 + 1] * fx) * (1 - fy) + (
        texture[y0 + 1, x0] * (1 - fx) + texture[y0 + 1, x0 + 1] * fx
    ) * fy
    light = rng.uniform(0.55, 1.0, 2)  # the two walls lit differently
    col = col * np.where(wall == 1, light[1], light[0])[:, None]
    sky_top, sky_bottom = rng.uniform(0.5, 1.0, 3), rng.uniform(0.3, 0.9, 3)
    rows = np.repeat(np.linspace(0, 1, H2), W2)[:, None]
    sky = sky_top * (1 - rows) + sky_bottom * rows
    col = np.where((wall >= 0)[:, None], col, sky)
    gain, tint, gamma = rng.uniform(0.7, 1.25), rng.uniform(0.9, 1.1, 3), rng.uniform(0.8, 1.25)
    col = np.clip(col * gain * tint, 0, 1) ** gamma
    img = col.reshape(H2, W2, 3).reshape(height, supersample, width, supersample, 3).mean((1, 3))
    img = np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1)
    depth = (tt * (dirs_cam[:, 2] / np.linalg.norm(dirs_cam, axis=1)) * np.linalg.norm(dirs, axis=1)).reshape(H2, W2)
    depth = np.where(np.isfinite(depth), depth, np.inf)
    return (img * 255 + 0.5).astype(np.uint8), depth[::supersample, ::supersample]


def synth_cluster(folder: Path, rng, images: int, width: int, height: int, points: int = 3000):
    """Render one cluster into folder/images and write its model to folder/sparse/0.
    Returns the ground truth (walls, cameras, points, visibility)."""
    import pycolmap
    from PIL import Image

    walls = {"LA": float(rng.uniform(3, 6)), "LB": float(rng.uniform(2, 5)), "H": float(rng.uniform(2.5, 4))}
    texture = make_texture(rng, walls["LA"] + walls["LB"], walls["H"])
    cams = sample_cameras(rng, images, walls, width, height)
    # 3D points on the walls, uniformly by area
    on_a = rng.random(points) < walls["LA"] / (walls["LA"] + walls["LB"])
    s, h = rng.random(points), rng.uniform(0, walls["H"], points)
    xyz = np.where(
        on_a[:, None],
        np.stack([s * walls["LA"], h, np.zeros(points)], 1),
        np.stack([np.zeros(points), h, s * walls["LB"]], 1),
    )
    (folder / "images").mkdir(parents=True, exist_ok=True)
    visible = []  # per image: (point indices, xy)
    for k, (R, t, f) in enumerate(cams):
        img, depth = render(R, t, f, width, height, walls, texture, rng)
        Image.fromarray(img).save(folder / "images" / f"img_{k:03d}.jpg", quality=92)
        Xc = xyz @ R.T + t
        z = Xc[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            xy = f * Xc[:, :2] / z[:, None] + np.array([width / 2, height / 2])
        inside = (
            (z > 1e-6) & (xy[:, 0] >= 0.5) & (xy[:, 0] < width - 0.5) & (xy[:, 1] >= 0.5) & (xy[:, 1] < height - 0.5)
        )
        idx = np.flatnonzero(inside)
        px = np.clip(xy[idx].astype(int), 0, [width - 1, height - 1])
        seen = np.abs(depth[px[:, 1], px[:, 0]] - z[idx]) < 0.02 * z[idx] + 0.02
        idx = idx[seen]
        visible.append((idx, xy[idx]))
    counts = np.bincount(np.concatenate([v[0] for v in visible]), minlength=points)
    keep = counts >= 2  # a track needs two views
    rec = pycolmap.Reconstruction()
    for k, (R, t, f) in enumerate(cams):
        cam = pycolmap.Camera.create_from_model_name(k + 1, "PINHOLE", f, width, height)
        cam.params = [f, f, width / 2, height / 2]
        rec.add_camera_with_trivial_rig(cam)
    kp_index = []
    for k, (R, t, f) in enumerate(cams):
        idx, xy = visible[k]
        sel = keep[idx]
        idx, xy = idx[sel], xy[sel]
        visible[k] = (idx, xy)
        kp_index.append({int(p): j for j, p in enumerate(idx)})
        im = pycolmap.Image(
            name=f"img_{k:03d}.jpg", keypoints=xy.reshape(-1, 2).astype(np.float64), camera_id=k + 1, image_id=k + 1
        )
        rec.add_image_with_trivial_frame(im, pycolmap.Rigid3d(pycolmap.Rotation3d(R), t))
    point_id = {}
    for p in np.flatnonzero(keep):
        elems = [pycolmap.TrackElement(k + 1, kp_index[k][int(p)]) for k in range(len(cams)) if int(p) in kp_index[k]]
        point_id[int(p)] = rec.add_point3D(xyz[p], pycolmap.Track(elems))
    (folder / "sparse" / "0").mkdir(parents=True, exist_ok=True)
    rec.write_binary(str(folder / "sparse" / "0"))
    return {
        "walls": walls,
        "cameras": [{"R": R.tolist(), "t": t.tolist(), "f": f} for R, t, f in cams],
        "points": {str(point_id[p]): xyz[p].tolist() for p in point_id},
        "visible": [[point_id[int(p)] for p in v[0]] for v in visible],
    }


def synth(
    output: str | Path,
    clusters: int = 12,
    images_per_cluster: int = 40,
    image_size: tuple[int, int] = (320, 240),
    seed: int = 0,
    overwrite: bool = False,
    points: int = 3000,
) -> dict:
    """Write a synthetic world to ``output``: ``cluster_XX/images`` and
    ``cluster_XX/sparse/0`` per cluster, and ``world.json`` (the exact ground truth)."""
    from sfmpairs.common import SfmpairsError, progress

    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise SfmpairsError(f"{output}: folder exists and is not empty; pass --overwrite")
    if clusters < 1 or images_per_cluster < 2:
        raise SfmpairsError("--clusters must be at least 1 and --images-per-cluster at least 2")
    width, height = image_size
    if not (16 <= width <= 4096 and 16 <= height <= 4096):
        raise SfmpairsError(f"--image-size {width}x{height}: each side must be 16 to 4096 pixels")
    world = {"seed": seed, "image_size": [width, height], "clusters": {}}
    for c in progress(range(clusters), desc="synth", unit="cluster"):
        rng = np.random.default_rng([seed, c])
        name = f"cluster_{c:02d}"
        world["clusters"][name] = synth_cluster(output / name, rng, images_per_cluster, width, height, points)
    (output / "world.json").write_text(json.dumps(world))
    return world
