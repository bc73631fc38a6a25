"""``sfmpairs synth``: a synthetic world, rendered, with exact COLMAP models.

Each cluster is a building corner: two textured walls meeting at a right angle, with a
texture of its own (procedural: a palette, smooth noise, a grid of windows, a few
blobs), seen by cameras at varied distances, angles and focal lengths, under varied
lighting, often of only part of the walls. Photos are rendered by exact ray casting; the
COLMAP model (written with pycolmap) holds the cameras, their poses, 3D points on the
walls and, as observations, every visible projection (a z-buffer decides visibility).

``hard=True`` makes the world hard in the ways real landmarks are (:data:`HARD`):
places come in a few texture families that share palette and window grid (places that
look alike, repeated structure, similar colours), cameras range wider in distance,
angle and focal length (strong viewpoint and scale change), lighting changes more
(exposure, colour temperature, the shadow of a neighbouring building), and passers-by,
trees and vehicles stand between camera and walls (occluders: flat shapes facing the
camera; the z-buffer sees them, so the points they hide are not observed). With
``distractors=N`` the world also holds N photos that belong to no place: each shows a
place of the same families that no other photo sees, and they make one model,
``distractors/sparse/0``, with cameras and no 3D points, so that mining never makes
one a query or a positive, and evaluation counts it a negative of every query.

Frame of a cluster: y up, wall A in the plane z = 0 (x in [0, LA], y in [0, H]), wall B
in the plane x = 0 (z in [0, LB]), cameras in front of both (x > 0, z > 0). COLMAP
cameras look along +z with y down.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TEXTURE_PX_PER_UNIT = 96
# where a model folder holds its photos' exact depth maps (``synth(depth_maps=True)``), as
# in a COLMAP dense workspace: DEPTH_MAPS / "<photo name>.geometric.bin"
DEPTH_MAPS = Path("stereo", "depth_maps")

# the world of sfmpairs 0.2: places that differ in palette and texture
EASY = {
    "families": 0,
    "palette_jitter": 0.0,
    "marks": "random",
    "distance": (0.5, 2.2),
    "angle": (10, 80),
    "height": (-0.2, 0.3),
    "focal": (0.8, 1.6),
    "roll": 0.03,
    "wall_light": (0.55, 1.0),
    "gain": (0.7, 1.25),
    "gamma": (0.8, 1.25),
    "warmth": 0.0,
    "shadow": 0.0,
    "occluders": 0.0,
    "ground": False,
    "precision": "float64",
}
# places that look alike (4 families: palette within 0.3, one window grid), seen from
# 0.45 to 2.4 wall heights with focal lengths 0.75 to 1.7 (scale changes up to 12x),
# under warm or cold light and shadows, half of the photos with something in front
_LOOK_ALIKE = {"families": 4, "palette_jitter": 0.3, "marks": "palette"}
_VIEWPOINT = {"distance": (0.45, 2.4), "angle": (8, 82), "height": (-0.2, 0.4), "focal": (0.75, 1.7), "roll": 0.05}
_LIGHT_AND_CLUTTER = {"warmth": 0.08, "shadow": 0.25, "occluders": 0.5, "ground": True}
HARD = {**EASY, **_LOOK_ALIKE, **_VIEWPOINT, **_LIGHT_AND_CLUTTER, "precision": "float32"}


def _smooth_noise(rng, h: int, w: int, octaves=(4, 9, 23)) -> np.ndarray:
    """Value noise in [0, 1], (h, w): a few octaves of bilinearly upsampled random grids."""
    noise = np.zeros((h, w))
    for cells in octaves:
        g = rng.normal(size=(cells + 1, cells + 1))
        yy = np.linspace(0, cells, h)[:, None]
        xx = np.linspace(0, cells, w)[None, :]
        y0, x0 = np.minimum(yy.astype(int), cells - 1), np.minimum(xx.astype(int), cells - 1)
        fy, fx = yy - y0, xx - x0
        noise += (
            (g[y0, x0] * (1 - fx) + g[y0, x0 + 1] * fx) * (1 - fy)
            + (g[y0 + 1, x0] * (1 - fx) + g[y0 + 1, x0 + 1] * fx) * fy
        ) / cells**0.5
    return (noise - noise.min()) / (np.ptp(noise) + 1e-9)


def make_family(rng) -> dict:
    """A texture family: the palette and window grid that its places share."""
    return {
        "palette": rng.uniform(0.05, 0.95, (3, 3)).tolist(),
        "spacing": [float(rng.uniform(0.3, 0.8)), float(rng.uniform(0.4, 0.9))],
        "fill": [float(rng.uniform(0.35, 0.7)), float(rng.uniform(0.35, 0.7))],
    }


def make_texture(
    rng,
    width_units: float,
    height_units: float,
    family: dict | None = None,
    palette_jitter: float = 0.0,
    marks: str = "random",
) -> np.ndarray:
    """A procedural facade texture (H, W, 3) float in [0, 1]. With a ``family``, the
    palette is the family's moved by ``palette_jitter`` (normal, per channel) and the
    window grid the family's within 10 %; noise, blobs and marks are the place's own.
    ``marks``: small marks in random pure colours, or (``palette``) in shades of the
    place's palette."""
    w, h = int(width_units * TEXTURE_PX_PER_UNIT), int(height_units * TEXTURE_PX_PER_UNIT)
    if family is None:
        palette = rng.uniform(0.05, 0.95, (3, 3))
    else:
        palette = np.clip(np.array(family["palette"]) + rng.normal(0, palette_jitter, (3, 3)), 0.02, 0.98)
    noise = _smooth_noise(rng, h, w)
    tex = palette[0] * (1 - noise[..., None]) + palette[1] * noise[..., None]
    # windows: a grid of rectangles in the third colour, with a frame
    if family is None:
        sx, sy = rng.uniform(0.3, 0.8), rng.uniform(0.4, 0.9)  # spacing, units
        fill_x, fill_y = rng.uniform(0.35, 0.7), rng.uniform(0.35, 0.7)
    else:
        (sx, sy), (fill_x, fill_y) = np.array(family["spacing"]) * rng.uniform(0.9, 1.1, 2), family["fill"]
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
        if marks == "palette":
            tex[y0 : y0 + dy, x0 : x0 + dx] = np.clip(palette[rng.integers(3)] * rng.uniform(0.4, 1.6), 0, 1)
        else:
            tex[y0 : y0 + dy, x0 : x0 + dx] = rng.choice([0.0, 1.0], 3) * rng.uniform(0.6, 1.0)
    return np.clip(tex + rng.normal(0, 0.02, tex.shape), 0, 1)


def _look_at(centre, target, roll_rng, roll: float = 0.03):
    z = target - centre
    z /= np.linalg.norm(z)
    down = np.array([0.0, -1.0, 0.0])
    x = np.cross(down, z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])  # rows: camera axes in world coordinates (cam_from_world)
    a = roll_rng.normal(0, roll)
    roll = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return roll @ R


def sample_cameras(rng, n: int, walls: dict, width: int, height: int, look: dict = EASY):
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
        ang = rng.uniform(*np.deg2rad(look["angle"]))  # direction in the x-z quadrant
        dist = rng.uniform(*look["distance"]) * H
        direction = np.array([np.cos(ang), 0.0, np.sin(ang)])
        centre = target + dist * direction + np.array([0.0, rng.uniform(*look["height"]) * H, 0.0])
        centre[0], centre[2] = max(centre[0], 0.3), max(centre[2], 0.3)
        R = _look_at(centre, target, rng, look["roll"])
        f = rng.uniform(*look["focal"]) * width
        cams.append((R, -R @ centre, f))
    return cams


def sample_occluders(rng, R, t, f, width: int, height: int, walls: dict, mean: float) -> list[dict]:
    """Things between one camera and the walls (a Poisson number, ``mean`` on average):
    flat vertical shapes facing the camera, standing on the ground (y = 0) or floating
    (a canopy), each in front of the walls along its own ray. ``base``: the shape's
    centre on the ground (x, z); ``across``: its horizontal unit direction; ``half_width``,
    ``bottom``, ``top`` in world units; ``shape``: rect or ellipse."""
    C = -R.T @ t
    out = []
    for _ in range(rng.poisson(mean)):
        # a ray through a random pixel, and the wall it hits there
        px = np.array([rng.uniform(0.1, 0.9) * width - width / 2, rng.uniform(0.2, 0.95) * height - height / 2, f])
        d = R.T @ px
        hit, wall, _, _ = _ray_hits(C, d[None], walls)
        if wall[0] < 0:
            continue
        depth = rng.uniform(0.3, 0.8) * hit[0]  # along the ray, in front of the wall
        Q = C + depth * d
        view = Q - C
        across = np.array([-view[2], 0.0, view[0]])
        across /= np.linalg.norm(across)
        scale = depth  # world units per pixel there (d's depth along the optical axis is f)
        half_width = rng.uniform(0.04, 0.2) * width * scale
        shape = "ellipse" if rng.random() < 0.5 else "rect"
        if shape == "ellipse":  # a canopy or a bush around the point
            half_height = rng.uniform(0.7, 1.6) * half_width
            bottom, top = Q[1] - half_height, Q[1] + half_height
        else:  # a post, a person, a vehicle: from the ground up past the point
            bottom, top = min(0.0, Q[1] - 0.5), Q[1] + rng.uniform(0.0, 0.25) * height * scale
        out.append(
            {
                "base": [float(Q[0]), float(Q[2])],
                "across": [float(across[0]), float(across[2])],
                "half_width": float(half_width),
                "bottom": float(bottom),
                "top": float(top),
                "shape": shape,
                "colour": rng.uniform(0.05, 0.8, 3).tolist(),
                "pattern": int(rng.integers(0, 2**31)),
            }
        )
    return out


def occluder_hits(C, D, occ: dict):
    """Where rays from C along D (N, 3) meet one occluder: (t, inf where they miss; s, the
    signed distance across from its centre; y, the height)."""
    base = np.array([occ["base"][0], 0.0, occ["base"][1]], D.dtype)
    across = np.array([occ["across"][0], 0.0, occ["across"][1]], D.dtype)
    normal = np.array([across[2], 0.0, -across[0]], D.dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = ((base - C) @ normal) / (D @ normal)
        P = C + t[:, None] * D
    s, y = (P - base) @ across, P[:, 1]
    hw, bottom, top = occ["half_width"], occ["bottom"], occ["top"]
    if occ["shape"] == "ellipse":
        cy, hh = (bottom + top) / 2, (top - bottom) / 2
        inside = (s / hw) ** 2 + ((y - cy) / hh) ** 2 <= 1
    else:
        inside = (np.abs(s) <= hw) & (y >= bottom) & (y <= top)
    ok = inside & (t > 1e-6) & np.isfinite(t)
    return np.where(ok, t, np.inf), s, y


def _ray_hits(C, D, walls, occluders=(), ground: bool = False):
    """Nearest hit of rays from C along D (N, 3): (t, what: 0/1 wall A/B, 2 + k occluder k,
    -2 the ground (y = 0, with ``ground``), -1 sky; u, v), with u the texture column in
    units (wall A: x; wall B: LA + z) and v the height; on an occluder, u is across it and
    v the height; on the ground, (x, z)."""
    LA, LB, H = walls["LA"], walls["LB"], walls["H"]
    n = len(D)
    best_t = np.full(n, np.inf, D.dtype)
    wall = np.full(n, -1)
    u = np.zeros(n, D.dtype)
    v = np.zeros(n, D.dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        for wid, axis, length, offset in ((0, 2, LA, 0.0), (1, 0, LB, LA)):
            t = -C[axis] / D[:, axis]
            P = C + t[:, None] * D
            along = P[:, 0] if wid == 0 else P[:, 2]
            ok = (t > 1e-6) & (along >= 0) & (along <= length) & (P[:, 1] >= 0) & (P[:, 1] <= H) & (t < best_t)
            best_t[ok], wall[ok] = t[ok], wid
            u[ok], v[ok] = offset + along[ok], P[ok, 1]
    if ground:
        with np.errstate(divide="ignore", invalid="ignore"):
            t = -C[1] / D[:, 1]
        ok = (t > 1e-6) & (t < best_t)
        best_t[ok], wall[ok] = t[ok], -2
        u[ok], v[ok] = C[0] + t[ok] * D[ok, 0], C[2] + t[ok] * D[ok, 2]
    for k, occ in enumerate(occluders):
        t, s, y = occluder_hits(C, D, occ)
        ok = t < best_t
        best_t[ok], wall[ok], u[ok], v[ok] = t[ok], 2 + k, s[ok], y[ok]
    return best_t, wall, u, v


def _occluder_colour(occ: dict, s, y):
    """An occluder's own texture: its colour under a pattern fixed by its seed."""
    rng = np.random.default_rng(occ["pattern"])
    g = rng.uniform(0.55, 1.1, (9, 9))
    a = np.clip((s / occ["half_width"] + 1) * 4, 0, 7.999).astype(int)
    b = np.clip((y - occ["bottom"]) / (occ["top"] - occ["bottom"] + 1e-9) * 8, 0, 7.999).astype(int)
    return np.clip(np.array(occ["colour"]) * g[b, a][:, None], 0, 1)


def _pixel_rays(R, t, f, width: int, height: int, supersample: int, dt):
    """The camera centre and the rays through a grid of ``supersample`` x ``supersample``
    samples per pixel (row by row): (C, directions in the camera frame (N, 3), whose z is
    ``f``, the same directions in world coordinates)."""
    W2, H2 = width * supersample, height * supersample
    C = (-R.T @ t).astype(dt)
    xs = (np.arange(W2) + 0.5) / supersample - width / 2
    ys = (np.arange(H2) + 0.5) / supersample - height / 2
    dirs_cam = np.stack(np.broadcast_arrays(xs[None, :], ys[:, None], np.full((H2, W2), f)), -1).reshape(-1, 3)
    dirs_cam = dirs_cam.astype(dt)
    if dt == np.float64:  # to world (as sfmpairs 0.2 did, bit for bit)
        dirs = dirs_cam @ R
    else:  # the same, without a matrix product of 3 columns (slow in BLAS)
        dirs = (
            dirs_cam[:, :1] * R[0].astype(dt) + dirs_cam[:, 1:2] * R[1].astype(dt) + dirs_cam[:, 2:] * R[2].astype(dt)
        )
    return C, dirs_cam, dirs


def _texture_colour(texture, u, v, wall_height: float):
    """The walls' texture at (u, v), bilinearly interpolated: (N, 3)."""
    th, tw = texture.shape[:2]
    px = np.clip(u * TEXTURE_PX_PER_UNIT, 0, tw - 1.001)
    py = np.clip((wall_height - v) * TEXTURE_PX_PER_UNIT, 0, th - 1.001)
    x0, y0 = px.astype(int), py.astype(int)
    fx, fy = (px - x0)[:, None], (py - y0)[:, None]
    flat, at = texture.reshape(-1, 3), y0 * tw + x0  # one gather per corner
    return (flat.take(at, 0) * (1 - fx) + flat.take(at + 1, 0) * fx) * (1 - fy) + (
        flat.take(at + tw, 0) * (1 - fx) + flat.take(at + tw + 1, 0) * fx
    ) * fy


def _light_walls(col, wall, u, v, walls: dict, look: dict, rng, effects_rng):
    """Each wall under its own light, and (hard world) the shadow of a building out of
    view: below a sloping line across the walls."""
    light = rng.uniform(*look["wall_light"], 2)  # the two walls lit differently
    col = col * np.where(wall == 1, light[1], light[0]).astype(col.dtype)[:, None]
    if effects_rng is not None and look["shadow"] and effects_rng.random() < look["shadow"]:
        slope, level = effects_rng.uniform(-0.4, 0.4), effects_rng.uniform(0.2, 1.0) * walls["H"]
        shade = effects_rng.uniform(0.45, 0.7)
        col[((wall == 0) | (wall == 1)) & (v < level + slope * (u - (walls["LA"] + walls["LB"]) / 2))] *= shade
    return col


def _paint_the_rest(col, wall, u, v, occluders, look: dict, rng, rows: int) -> None:
    """Occluders in their own colours, the ground's paving stones (hard world) and the
    sky's gradient over ``rows`` rows of samples, in place."""
    for k, occ in enumerate(occluders):
        hit = wall == 2 + k
        col[hit] = _occluder_colour(occ, u[hit], v[hit])
    if look["ground"]:  # grey paving stones of half a unit
        hit = wall == -2
        tiles = (np.floor(u[hit] / 0.5) + np.floor(v[hit] / 0.5)) % 2
        col[hit] = 0.4 * (0.85 + 0.15 * tiles)[:, None] * np.array([1.0, 0.98, 0.94])
    sky_top, sky_bottom = rng.uniform(0.5, 1.0, 3), rng.uniform(0.3, 0.9, 3)
    sky = wall == -1
    height = np.repeat(np.linspace(0, 1, rows), len(col) // rows)[sky][:, None]
    col[sky] = sky_top * (1 - height) + sky_bottom * height


def _camera_response(col, look: dict, rng, effects_rng):
    """Exposure (gain), white balance (tint; hard world: warm or cold light) and gamma."""
    gain, tint, gamma = rng.uniform(*look["gain"]), rng.uniform(0.9, 1.1, 3), rng.uniform(*look["gamma"])
    if effects_rng is not None and look["warmth"]:
        w = effects_rng.uniform(-look["warmth"], look["warmth"])
        tint = tint * np.array([1 + w, 1.0, 1 - w])
    return np.clip(col * gain * tint.astype(col.dtype), 0, 1) ** gamma


def render(
    R, t, f, width, height, walls, texture, rng, supersample: int = 2, look: dict = EASY, occluders=(), effects_rng=None
):
    """(uint8 image (H, W, 3), depth (H, W)): the depth is z (along the optical axis) at
    each pixel's first sub-sample, inf on sky: the z-buffer that decides which points a
    photo observes (:func:`depth_map` gives exact depth at pixel centres). Computes in
    the texture's precision (the hard world's is float32: twice as fast).
    ``effects_rng`` draws the hard world's colour temperature and shadow."""
    C, dirs_cam, dirs = _pixel_rays(R, t, f, width, height, supersample, texture.dtype)
    tt, wall, u, v = _ray_hits(C, dirs, walls, occluders, look["ground"])
    col = _light_walls(_texture_colour(texture, u, v, walls["H"]), wall, u, v, walls, look, rng, effects_rng)
    _paint_the_rest(col, wall, u, v, occluders, look, rng, height * supersample)
    col = _camera_response(col, look, rng, effects_rng)
    img = col.reshape(height, supersample, width, supersample, 3).mean((1, 3))
    img = np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1)
    # z: the distance along the ray times the cosine of its angle to the optical axis
    H2, W2 = height * supersample, width * supersample
    dc = dirs_cam.reshape(H2, W2, 3)[::supersample, ::supersample]
    dw = dirs.reshape(H2, W2, 3)[::supersample, ::supersample]
    depth = (
        tt.reshape(H2, W2)[::supersample, ::supersample]
        * (dc[..., 2] / np.linalg.norm(dc, axis=-1))
        * np.linalg.norm(dw, axis=-1)
    )
    depth = np.where(np.isfinite(depth), depth, np.inf)
    return (img * 255 + 0.5).astype(np.uint8), depth


def depth_map(R, t, f, width: int, height: int, walls: dict, occluders=(), ground: bool = False) -> np.ndarray:
    """Exact depth as COLMAP's depth maps hold it: z in the camera frame (along the
    optical axis, not along the ray) of the nearest surface (walls, occluders, and the
    ground with ``ground``) seen through each pixel's centre, (height, width) float64;
    0 where the ray meets none (sky)."""
    C, _, dirs = _pixel_rays(R, t, f, width, height, 1, np.float64)
    z = _ray_hits(C, dirs, walls, occluders, ground)[0] * f  # the rays' z in the camera frame is f
    return np.where(np.isfinite(z), z, 0.0).reshape(height, width)


def _random_walls(rng) -> dict:
    return {"LA": float(rng.uniform(3, 6)), "LB": float(rng.uniform(2, 5)), "H": float(rng.uniform(2.5, 4))}


def _wall_points(rng, walls: dict, points: int) -> np.ndarray:
    """``points`` 3D points on the walls, uniformly by area: (points, 3)."""
    on_a = rng.random(points) < walls["LA"] / (walls["LA"] + walls["LB"])
    s, h = rng.random(points), rng.uniform(0, walls["H"], points)
    return np.where(
        on_a[:, None],
        np.stack([s * walls["LA"], h, np.zeros(points)], 1),
        np.stack([np.zeros(points), h, s * walls["LB"]], 1),
    )


def _observed(xyz, R, t, f, width: int, height: int, depth) -> tuple[np.ndarray, np.ndarray]:
    """The points a photo observes: (indices, xy) of those in frame whose z agrees with
    the z-buffer ``depth`` at their pixel (not hidden by the other wall or an occluder)."""
    Xc = xyz @ R.T + t
    z = Xc[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        xy = f * Xc[:, :2] / z[:, None] + np.array([width / 2, height / 2])
    inside = (z > 1e-6) & (xy[:, 0] >= 0.5) & (xy[:, 0] < width - 0.5) & (xy[:, 1] >= 0.5) & (xy[:, 1] < height - 0.5)
    idx = np.flatnonzero(inside)
    px = np.clip(xy[idx].astype(int), 0, [width - 1, height - 1])
    idx = idx[np.abs(depth[px[:, 1], px[:, 0]] - z[idx]) < 0.02 * z[idx] + 0.02]
    return idx, xy[idx]


def _photo(folder: Path, name: str, cam, scene: dict, rng, aux_rng, depth_maps: bool):
    """Render one photo of ``scene`` (walls, texture, xyz, look, size) into
    folder/images/name (and its exact depth map with ``depth_maps``). ``aux_rng`` draws
    the hard world's occluders and lighting effects. Returns (occluders, (indices, xy) of
    the points it observes)."""
    from PIL import Image

    from sfmpairs.sfm_io.colmap_depth import write_depth_map

    (R, t, f), (width, height), look, walls = cam, scene["size"], scene["look"], scene["walls"]
    occ = []
    if aux_rng is not None and look["occluders"]:
        occ = sample_occluders(aux_rng, R, t, f, width, height, walls, look["occluders"])
    img, depth = render(
        R, t, f, width, height, walls, scene["texture"], rng, look=look, occluders=occ, effects_rng=aux_rng
    )
    Image.fromarray(img).save(folder / "images" / name, quality=92)
    if depth_maps:
        exact = depth_map(R, t, f, width, height, walls, occ, look["ground"])
        (folder / DEPTH_MAPS).mkdir(parents=True, exist_ok=True)
        write_depth_map(folder / DEPTH_MAPS / f"{name}.geometric.bin", exact)
    return occ, _observed(scene["xyz"], R, t, f, width, height, depth)


def _add_photos(rec, cams, size, visible) -> None:
    """The photos' PINHOLE cameras (one each) and images, with the observed points'
    projections as keypoints, into the pycolmap reconstruction ``rec``."""
    import pycolmap

    width, height = size
    for k, (R, t, f) in enumerate(cams):
        cam = pycolmap.Camera.create_from_model_name(k + 1, "PINHOLE", f, width, height)
        cam.params = [f, f, width / 2, height / 2]
        rec.add_camera_with_trivial_rig(cam)
    for k, ((R, t, f), (_, xy)) in enumerate(zip(cams, visible)):
        keypoints = xy.reshape(-1, 2).astype(np.float64)
        im = pycolmap.Image(name=f"img_{k:03d}.jpg", keypoints=keypoints, camera_id=k + 1, image_id=k + 1)
        rec.add_image_with_trivial_frame(im, pycolmap.Rigid3d(pycolmap.Rotation3d(R), t))


def _write_model(folder: Path, cams, size, xyz, visible):
    """folder/sparse/0: the photos, and as 3D points those of ``xyz`` that two or more
    photos observe (``visible``: per photo, (indices, xy)). Returns (point index -> COLMAP
    id, ``visible`` without the points left out)."""
    import pycolmap

    counts = np.bincount(np.concatenate([idx for idx, _ in visible]), minlength=len(xyz))
    keep = counts >= 2  # a track needs two views
    visible = [(idx[keep[idx]], xy[keep[idx]]) for idx, xy in visible]
    rec = pycolmap.Reconstruction()
    _add_photos(rec, cams, size, visible)
    kp_index = [{int(p): j for j, p in enumerate(idx)} for idx, _ in visible]
    point_id = {}
    for p in np.flatnonzero(keep):
        elems = [pycolmap.TrackElement(k + 1, kp[int(p)]) for k, kp in enumerate(kp_index) if int(p) in kp]
        point_id[int(p)] = rec.add_point3D(xyz[p], pycolmap.Track(elems))
    (folder / "sparse" / "0").mkdir(parents=True, exist_ok=True)
    rec.write_binary(str(folder / "sparse" / "0"))
    return point_id, visible


def _camera_json(R, t, f, occluders) -> dict:
    out = {"R": R.tolist(), "t": t.tolist(), "f": f}
    if occluders:
        out["occluders"] = occluders
    return out


def synth_cluster(
    folder: Path,
    rng,
    images: int,
    width: int,
    height: int,
    points: int = 3000,
    look: dict = EASY,
    family: dict | None = None,
    aux_rng=None,
    depth_maps: bool = False,
):
    """Render one cluster into folder/images and write its model to folder/sparse/0
    (and with ``depth_maps``, the photos' exact depth maps, see :data:`DEPTH_MAPS`).
    Returns the ground truth (walls, cameras with their occluders, points, visibility).
    ``aux_rng`` draws the hard world's occluders and lighting effects (the easy world,
    without it, draws exactly as sfmpairs 0.2 did)."""
    walls = _random_walls(rng)
    texture = make_texture(rng, walls["LA"] + walls["LB"], walls["H"], family, look["palette_jitter"], look["marks"])
    scene = {"walls": walls, "texture": texture.astype(look["precision"]), "look": look, "size": (width, height)}
    cams = sample_cameras(rng, images, walls, width, height, look)
    scene["xyz"] = xyz = _wall_points(rng, walls, points)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    shots = [_photo(folder, f"img_{k:03d}.jpg", cam, scene, rng, aux_rng, depth_maps) for k, cam in enumerate(cams)]
    point_id, visible = _write_model(folder, cams, (width, height), xyz, [seen for _, seen in shots])
    return {
        "walls": walls,
        "cameras": [_camera_json(R, t, f, occ) for (R, t, f), (occ, _) in zip(cams, shots)],
        "points": {str(point_id[p]): xyz[p].tolist() for p in point_id},
        "visible": [[point_id[int(p)] for p in idx] for idx, _ in visible],
    }


def synth_distractors(
    folder: Path, seed: int, count: int, size, look: dict, families: list[dict], depth_maps: bool = False
) -> dict:
    """``count`` photos that belong to no place, in folder/images, and a model of their
    cameras without 3D points in folder/sparse/0. Photo k shows a place of its own (of
    one of ``families`` where there are any), seen once."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    out = {"walls": [], "cameras": [], "family": []}
    cams = []
    for k in range(count):
        rng = np.random.default_rng([seed, k, 2])
        fam = int(rng.integers(len(families))) if families else None
        walls = _random_walls(rng)
        family = families[fam] if families else None
        texture = make_texture(
            rng, walls["LA"] + walls["LB"], walls["H"], family, look["palette_jitter"], look["marks"]
        )
        scene = {"walls": walls, "texture": texture.astype(look["precision"]), "look": look, "size": size}
        scene["xyz"] = np.zeros((0, 3))
        cams += sample_cameras(rng, 1, walls, *size, look)
        occ, _ = _photo(folder, f"img_{k:03d}.jpg", cams[-1], scene, rng, rng, depth_maps)
        out["walls"].append(walls)
        out["cameras"].append(_camera_json(*cams[-1], occ))
        out["family"].append(fam)
    _write_model(folder, cams, size, np.zeros((0, 3)), [(np.zeros(0, int), np.zeros((0, 2)))] * count)
    return out


def _check_synth_options(output: Path, clusters, images_per_cluster, image_size, distractors, overwrite) -> None:
    from sfmpairs.common import SfmpairsError, check_folder_output

    check_folder_output(output, overwrite)  # before the work; also a name too long for the file system
    if clusters < 1 or images_per_cluster < 2:
        raise SfmpairsError("--clusters must be at least 1 and --images-per-cluster at least 2")
    if distractors < 0:
        raise SfmpairsError(f"--distractors {distractors}: give 0 or more")
    width, height = image_size
    if not (16 <= width <= 4096 and 16 <= height <= 4096):
        raise SfmpairsError(f"--image-size {width}x{height}: each side must be 16 to 4096 pixels")


def synth(
    output: str | Path,
    clusters: int = 12,
    images_per_cluster: int = 40,
    image_size: tuple[int, int] = (320, 240),
    seed: int = 0,
    overwrite: bool = False,
    points: int = 3000,
    hard: bool = False,
    distractors: int = 0,
    depth_maps: bool = False,
) -> dict:
    """Write a synthetic world to ``output``: ``cluster_XX/images`` and
    ``cluster_XX/sparse/0`` per cluster, ``distractors/images`` and
    ``distractors/sparse/0`` with ``distractors`` photos of no place, and
    ``world.json`` (the exact ground truth). ``hard``: the world of :data:`HARD`.
    ``depth_maps``: each photo's exact depth map in COLMAP's format beside its model,
    ``<model folder>/stereo/depth_maps/<photo name>.geometric.bin`` (as a COLMAP dense
    workspace holds them)."""
    from sfmpairs.common import atomic_folder

    output = Path(output)
    _check_synth_options(output, clusters, images_per_cluster, image_size, distractors, overwrite)
    with atomic_folder(output, overwrite) as work:  # built beside output: no partial world
        work.mkdir()
        return _synth_into(work, clusters, images_per_cluster, image_size, seed, points, hard, distractors, depth_maps)


def _synth_into(output: Path, clusters, images_per_cluster, image_size, seed, points, hard, distractors, depth_maps):
    from sfmpairs.common import progress

    look = HARD if hard else EASY
    families = [make_family(np.random.default_rng([seed, f, 1])) for f in range(look["families"])]
    world = {"seed": seed, "image_size": list(image_size), "clusters": {}}
    for c in progress(range(clusters), desc="synth", unit="cluster"):
        family = c % len(families) if families else None
        aux_rng = np.random.default_rng([seed, c, 3]) if hard else None
        truth = synth_cluster(
            output / f"cluster_{c:02d}",
            np.random.default_rng([seed, c]),
            images_per_cluster,
            *image_size,
            points=points,
            look=look,
            family=None if family is None else families[family],
            aux_rng=aux_rng,
            depth_maps=depth_maps,
        )
        world["clusters"][f"cluster_{c:02d}"] = {**truth, **({"family": family} if hard else {})}
    if hard:
        world.update(hard=True, families=families)
    if distractors:
        world["distractors"] = synth_distractors(
            output / "distractors", seed, distractors, tuple(image_size), look, families, depth_maps
        )
    if depth_maps:
        world["depth_maps"] = f"{DEPTH_MAPS.as_posix()}/<photo name>.geometric.bin"
    (output / "world.json").write_text(json.dumps(world))
    return world
