"""One image of the embedded benchmark: shapes, textures and their labels (no files).

:func:`render` draws the objects (one of :data:`CLASSES` each, told apart by shape only, with a random
colour, texture, size, position and rotation, later objects partly occluding earlier ones), distractor
shapes behind them and a textured background, and returns the image with its class and object maps
(VOC void band along the boundaries). :mod:`explainer.data.synthetic` writes these as a VOC tree.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from explainer.core.constants import VOID

CLASSES: tuple[str, ...] = (
    "circle",
    "cross",
    "crescent",
    "ell",
    "ring",
    "square",
    "star",
    "triangle",
)  # segmentation index = position + 1; the order is recorded in synthetic.json

# ---------------------------------------------------------------- shapes --
def _regular(n: int, r: float, phase: float = 0.0) -> np.ndarray:
    t = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _shape_polygons(name: str, r: float) -> list[tuple[np.ndarray, bool]]:
    """Polygons of a unit-centred shape of radius ``r``: (points, filled?).

    A polygon with ``filled=False`` is cut out of the previous ones (holes).
    """
    if name == "circle":
        return [(_regular(48, r), True)]
    if name == "ring":
        return [(_regular(48, r), True), (_regular(48, 0.55 * r), False)]
    if name == "square":
        return [(_regular(4, r, math.pi / 4), True)]
    if name == "triangle":
        return [(_regular(3, r * 1.1, -math.pi / 2), True)]
    if name == "star":
        t = np.arange(10) * math.pi / 5 - math.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, r * 1.1, r * 0.45)
        return [(np.stack([rad * np.cos(t), rad * np.sin(t)], 1), True)]
    if name == "cross":
        a, b = r, r * 0.33
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a),
               (-b, b), (-a, b), (-a, -b), (-b, -b)]
        return [(np.array(pts, float), True)]
    if name == "ell":
        a, b = r, r * 0.38
        pts = [(-a, -a), (-a + 2 * b, -a), (-a + 2 * b, a - 2 * b), (a, a - 2 * b), (a, a), (-a, a)]
        return [(np.array(pts, float), True)]
    if name == "crescent":
        return [(_regular(48, r), True), (_regular(48, 0.85 * r) + np.array([0.45 * r, -0.1 * r]), False)]
    raise ValueError(f"unknown shape {name!r}; expected one of {CLASSES}")


def _rasterise(polys, cx, cy, angle, size, scale=1.0) -> np.ndarray:
    """Boolean mask (size, size) of the rotated shape, drawn at 2x and reduced."""
    ss = 2
    img = Image.new("L", (size * ss, size * ss), 0)
    d = ImageDraw.Draw(img)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    for pts, fill in polys:
        p = (pts * scale) @ rot.T + np.array([cx, cy])
        d.polygon([tuple(q) for q in (p * ss)], fill=255 if fill else 0)
    img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img) >= 128


# -------------------------------------------------------------- textures --
def _texture(rng: np.random.Generator, size: int, kind: str, c1, c2) -> np.ndarray:
    """An RGB float texture (size, size, 3) in [0, 1] mixing colours c1 and c2."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "solid":
        w = np.zeros((size, size), np.float32)
    elif kind == "stripes":
        th = rng.uniform(0, math.pi)
        period = rng.uniform(4, 12)
        w = (np.sin((xx * math.cos(th) + yy * math.sin(th)) * 2 * math.pi / period) > 0).astype(np.float32)
    elif kind == "checker":
        p = int(rng.integers(3, 9))
        w = (((xx // p) + (yy // p)) % 2).astype(np.float32)
    elif kind == "noise":
        w = rng.random((size, size)).astype(np.float32)
    elif kind == "blobs":
        k = int(rng.integers(4, 10))
        small = rng.random((k, k)).astype(np.float32)
        w = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                       np.float32) / 255
    elif kind == "gradient":
        th = rng.uniform(0, 2 * math.pi)
        w = (xx * math.cos(th) + yy * math.sin(th)) / size
        w = (w - w.min()) / max(float(w.max() - w.min()), 1e-6)
    elif kind == "grid":  # reserved for the spurious-context background
        w = (((xx % 10) < 2) | ((yy % 10) < 2)).astype(np.float32)
    else:
        raise ValueError(kind)
    c1 = np.asarray(c1, np.float32)
    c2 = np.asarray(c2, np.float32)
    return c1 * (1 - w[..., None]) + c2 * w[..., None]


OBJECT_TEXTURES = ("solid", "stripes", "checker", "noise", "blobs", "gradient")
BACKGROUND_TEXTURES = ("stripes", "checker", "noise", "blobs", "gradient")


def _colour(rng):
    return rng.random(3).astype(np.float32)


def _contrasting_pair(rng, lo=0.25):
    c1 = _colour(rng)
    c2 = _colour(rng)
    while np.abs(c1 - c2).sum() < lo * 3:
        c2 = _colour(rng)
    return c1, c2


def _dilate(m: np.ndarray, r: int) -> np.ndarray:
    out = m.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(m, dy, 0), dx, 1)
    return out


# ---------------------------------------------------------------- images --
def render(rng: np.random.Generator, image_size: int, spurious_bg: bool = False,
           classes_wanted: list[int] | None = None):
    """Render one image. Returns (rgb uint8, class map, object map, objects list)."""
    s = image_size
    bg_kind = "grid" if spurious_bg else BACKGROUND_TEXTURES[int(rng.integers(len(BACKGROUND_TEXTURES)))]
    c1, c2 = _contrasting_pair(rng, 0.1)
    c2 = c1 * 0.6 + c2 * 0.4  # backgrounds are of lower contrast than objects
    img = _texture(rng, s, bg_kind, c1, c2)

    n_obj = len(classes_wanted) if classes_wanted is not None else int(rng.integers(1, 5))
    n_dis = int(rng.integers(0, 3))
    # distractors lie behind the objects: they clutter the scene without
    # hiding the shapes that carry the labels
    items = [("dis", None)] * n_dis + [("obj", None)] * n_obj
    order = range(len(items))
    cls_map = np.zeros((s, s), np.uint8)
    obj_map = np.zeros((s, s), np.uint8)
    owner = np.zeros((s, s), np.int32)  # 0 bg, >0 object id, <0 distractor
    objects: list[dict] = []
    full_masks: dict[int, np.ndarray] = {}
    next_obj = 0
    obj_classes = list(classes_wanted) if classes_wanted is not None else \
        [int(rng.integers(len(CLASSES))) for _ in range(n_obj)]
    dis_id = 0
    for idx in order:
        kind, _ = items[idx]
        angle = rng.uniform(0, 2 * math.pi)
        if kind == "obj":
            ci = obj_classes[next_obj]
            next_obj += 1
            r = rng.uniform(0.09, 0.2) * s
            for _ in range(30):
                cx, cy = rng.uniform(r, s - r, 2)
                m = _rasterise(_shape_polygons(CLASSES[ci], r), cx, cy, angle, s)
                # keep earlier objects at least half visible
                ok = True
                for oid, fm in full_masks.items():
                    vis = (owner == oid) & ~m
                    if vis.sum() < 0.5 * fm.sum():
                        ok = False
                        break
                if ok:
                    break
            oid = len(objects) + 1
            full_masks[oid] = m
            owner[m] = oid
            tex = OBJECT_TEXTURES[int(rng.integers(len(OBJECT_TEXTURES)))]
            t = _texture(rng, s, tex, *_contrasting_pair(rng))
            img[m] = t[m]
            objects.append({"name": CLASSES[ci], "class_index": ci, "id": oid})
        else:
            dis_id += 1
            dk = int(rng.integers(3))
            r = rng.uniform(0.06, 0.16) * s
            cx, cy = rng.uniform(r, s - r, 2)
            if dk == 0:  # elongated ellipse
                e = _regular(40, 1.0) * np.array([r, r * rng.uniform(0.15, 0.35)])
                m = _rasterise([(e, True)], cx, cy, angle, s)
            elif dk == 1:  # random irregular blob polygon
                k = int(rng.integers(5, 9))
                t_ = np.sort(rng.uniform(0, 2 * math.pi, k))
                rad = r * rng.uniform(0.4, 1.0, k)
                m = _rasterise([(np.stack([rad * np.cos(t_), rad * np.sin(t_)], 1), True)], cx, cy, angle, s)
            else:  # scribble: a thick polyline
                im = Image.new("L", (s, s), 0)
                pts = [tuple(rng.uniform(0, s, 2)) for _ in range(int(rng.integers(3, 6)))]
                ImageDraw.Draw(im).line(pts, fill=255, width=int(rng.integers(2, 5)))
                m = np.asarray(im) > 0
            owner[m] = -dis_id
            tex = OBJECT_TEXTURES[int(rng.integers(len(OBJECT_TEXTURES)))]
            t = _texture(rng, s, tex, *_contrasting_pair(rng))
            img[m] = t[m]

    img = np.clip(img + rng.normal(0, 0.03, img.shape).astype(np.float32), 0, 1)
    rgb = (img * 255).round().astype(np.uint8)
    pil = Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 0.6))))
    rgb = np.asarray(pil)

    # labels from the visible regions of each object
    kept = []
    for o in objects:
        vis = owner == o["id"]
        if vis.sum() < 12:  # fully hidden: the object is not in the image
            continue
        cls_map[vis] = o["class_index"] + 1
        obj_map[vis] = len(kept) + 1
        ys, xs = np.nonzero(vis)
        o = dict(o, bbox=(int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1),
                 visible=float(vis.sum() / full_masks[o["id"]].sum()))
        kept.append(o)
    # VOC void band: the pixels along every object boundary
    edge = np.zeros((s, s), bool)
    for k in range(1, len(kept) + 1):
        v = obj_map == k
        edge |= _dilate(v, 1) & ~_erode(v)
    cls_map[edge] = VOID
    obj_map[edge] = VOID
    return rgb, cls_map, obj_map, kept


def _erode(m: np.ndarray) -> np.ndarray:
    return ~_dilate(~m, 1)
