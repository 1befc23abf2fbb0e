"""Analytic adult thorax / upper-abdomen anatomy painted by :mod:`appliance.synth.phantom`.

Patient coordinates in mm (see phantom.py): x = patient right -> left, y = anterior -> posterior,
z = superior -> inferior with z = 0 at the lung apex; (x, y) = (0, 0) is the FOV centre and the
patient's back rests on the table at y = ``Y_BACK``.  Every structure is an analytic primitive
(superellipse, ellipsoid, capsule, rib band) evaluated at voxel centres and painted in a fixed
order, so the anatomy is identical at any resolution.  numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_TISSUES = [  # (label name, HU); the label id is the list index
    ("air", -1000), ("table", 200), ("fat", -100), ("muscle", 50), ("mediastinum", 40),
    ("abdomen", 35), ("lung", -850), ("lung_vessel", 40), ("airway_wall", 40), ("airway", -1000),
    ("pericardial_fat", -80), ("myocardium", 45), ("blood", 200), ("vein", 120), ("liver", 60),
    ("liver_vessel", 40), ("lesion", 60), ("spleen", 50), ("bowel_wall", 40),
    ("gastric_fluid", 10), ("gas", -1000), ("gallbladder", 10), ("perirenal_fat", -90),
    ("kidney", 30), ("renal_sinus", -40), ("pancreas", 40), ("visceral_fat", -95),
    ("cortical_bone", 1000), ("trabecular_bone", 250), ("posterior_elements", 800), ("disc", 80),
    ("canal", 20), ("rib_cortex", 900), ("rib_marrow", 300), ("cartilage", 150),
]
LABELS: dict[str, int] = {name: i for i, (name, _) in enumerate(_TISSUES)}
HU_BY_LABEL = np.array([hu for _, hu in _TISSUES], dtype=np.float32)
L = LABELS

Y_BACK = 118.0  # posterior skin surface (mm); the table plate lies just below it
# z-profiles (z anchors mm, values mm), linearly interpolated and clamped at the ends
_Z = (-100.0, 0.0, 60.0, 150.0, 250.0, 350.0, 500.0)
BODY_A = (_Z, (150, 158, 168, 172, 168, 162, 160))   # body half-width (LR)
BODY_B = (_Z, (100, 106, 116, 122, 120, 117, 114))   # body half-depth (AP)
FAT_LAT = ((0, 150, 300), (12, 14, 20))              # subcutaneous fat thickness, lateral
FAT_ANT = ((0, 150, 250, 300), (12, 14, 28, 30))     # ... anterior
FAT_POST = ((0, 300), (10, 14))                      # ... posterior
CAV_BACK = ((150, 300), (45, 40))                    # skin to posterior cavity wall
MUS_LAT, MUS_ANT = 14.0, 12.0                        # body-wall muscle thickness
VB_Y = ((-100, 200, 300, 500), (52, 52, 45, 42))     # vertebral body centre y
VB_A = ((-100, 100, 300, 500), (16, 20, 24, 26))     # vertebral body half-width
VB_B = ((-100, 100, 300, 500), (12, 14, 17, 18))     # vertebral body half-depth
VERT_SPACING = ((-100, 100, 280, 500), (22, 25, 32, 36))
DOME_MAX = 255.0                                     # deepest posterior costophrenic recess
LUNG_APEX_GROWTH = 70.0                              # apex cap height (mm)

# Organ ellipsoids: centre (x, y, z) and semi-axes (mm); perturbed per seed.
ORGANS = {
    "heart": ((15, -35, 160), (62, 52, 50)), "liver": ((-50, -5, 255), (100, 90, 95)),
    "spleen": ((95, 35, 235), (25, 50, 50)), "stomach": ((50, -35, 240), (45, 35, 50)),
    "gallbladder": ((-40, -55, 300), (15, 15, 35)), "kidney_r": ((-70, 52, 312), (28, 24, 55)),
    "kidney_l": ((72, 50, 298), (28, 24, 55)), "pancreas": ((25, 10, 285), (55, 12, 15)),
}
# Liver ROI kept free of lesions and vessels (z, y, x) and its radius; used by phantom.ROI_*.
LIVER_ROI = ((275.0, -10.0, -95.0), 15.0)
LUNG_ROI = ((130.0, 38.0, -86.0), 10.0)  # likewise kept free of pulmonary vessels


def interp(table, z: float) -> float:
    return float(np.interp(z, table[0], table[1]))


@dataclass
class Anatomy:
    """One seed's perturbed anatomy: scales, organ boxes, trees, vertebrae and lesions."""
    sa: float
    sb: float
    dome_r: float
    dome_l: float
    organs: dict
    vert_z: np.ndarray
    vert_s: np.ndarray
    rib_z0: float
    lung_vessels: list
    bronchi: list
    liver_vessels: list
    lesions: list  # [(centre xyz ndarray, radius mm, contrast HU)]

    def __post_init__(self):  # (z centre, z half-extent) of each lung vessel, to skip far ones fast
        zz = np.array([(a[2], b[2], r) for a, b, r in self.lung_vessels]).reshape(-1, 3)
        self.lv_zr = np.stack([(zz[:, 0] + zz[:, 1]) / 2, np.abs(zz[:, 0] - zz[:, 1]) / 2 + zz[:, 2]], 1)


def layers(an: Anatomy, z: float):
    """(y centre, half-width, half-depth) of body, body-wall muscle and body cavity at z."""
    a, b = interp(BODY_A, z) * an.sa, interp(BODY_B, z) * an.sb
    yc = Y_BACK - b
    mf, mb = yc - b + interp(FAT_ANT, z), Y_BACK - interp(FAT_POST, z)
    am = a - interp(FAT_LAT, z)
    cf, cb = mf + MUS_ANT, Y_BACK - interp(CAV_BACK, z)
    return (yc, a, b), ((mf + mb) / 2, am, (mb - mf) / 2), ((cf + cb) / 2, am - MUS_LAT, (cb - cf) / 2)


def dome(an: Anatomy, x, y):
    """z of the diaphragm surface (thorax above, abdomen below)."""
    r = an.dome_r + ((x + 55.0) ** 2 + (y + 5.0) ** 2) / 180.0
    left = an.dome_l + ((x - 60.0) ** 2 + (y + 5.0) ** 2) / 180.0
    return np.minimum(np.minimum(r, left), DOME_MAX)


def _in_cavity(an, x, y, z, margin):
    yc, a, b = layers(an, z)[2]
    return abs(x / (a - margin)) ** 2.2 + abs((y - yc) / (b - margin)) ** 2.2 < 1.0


def _liver_cut(x, y):
    """< 0 on the liver side of the plane that keeps the liver off the spine, aorta and stomach."""
    return x + 1.3 * y - 25.0


def in_liver(an: Anatomy, p, margin: float = 0.0) -> bool:
    """Is point p = (x, y, z) inside the liver by at least ``margin`` mm (approximate)?"""
    (cx, cy, cz), (ax, ay, az) = an.organs["liver"]
    x, y, z = p
    if ((x - cx) / (ax - margin)) ** 2 + ((y - cy) / (ay - margin)) ** 2 + ((z - cz) / (az - margin)) ** 2 >= 1:
        return False
    return bool(z > dome(an, x, y) + margin and _liver_cut(x, y) < -1.64 * margin and _in_cavity(an, x, y, z, margin))


def _seg_dist(p, a, b) -> float:
    d = b - a
    t = min(max(float(np.dot(p - a, d) / max(np.dot(d, d), 1e-9)), 0.0), 1.0)
    return float(np.linalg.norm(p - a - t * d))


def _unit(v):
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def build_anatomy(seed: int) -> Anatomy:
    rng = np.random.default_rng(seed)
    jit = lambda s, n=None: np.clip(rng.normal(0.0, s / 2, n), -s, s)  # noqa: E731
    sa, sb = 1 + jit(0.025), 1 + jit(0.025)
    dome_r, dome_l = 185 + jit(4.0), 197 + jit(4.0)
    organs = {k: (np.add(c, jit(3.0, 3)), np.multiply(s, 1 + jit(0.03, 3))) for k, (c, s) in ORGANS.items()}
    zs, ss, z = [], [], -309.0 + jit(3.0)
    while z < 1500:
        zs.append(z), ss.append(interp(VERT_SPACING, z))
        z += ss[-1]
    rib_z0 = 12.0 + jit(2.0)
    # pulmonary vessel trees: 8 primaries from each hilum, 4 generations of bifurcations
    prim = [((0.3, -0.2, -1), 70), ((0.4, 0.6, -0.8), 60), ((0.5, -0.8, -0.5), 55), ((1, 0, 0.1), 55),
            ((0.5, -0.9, 0.5), 55), ((0.7, 0.2, 0.8), 70), ((0.3, 0.8, 0.7), 70), ((0.05, 0.6, 1), 75)]
    lung_vessels, bronchi = [], []
    for side in (-1.0, 1.0):
        hilum = np.array([48 * side, 5.0, 122.0]) + jit(2.0, 3)
        carina = np.array([0.0, 12.0, 95.0])
        bronchi.append((carina, hilum + (0, 4, -6), 8.0, 5.5))
        stack = []
        for k, (d, ln) in enumerate(prim):
            d = _unit(np.multiply(d, (side, 1, 1)) + jit(0.1, 3))
            stack.append((hilum, d, ln, 4.0, 0))
            if k in (0, 4, 6):
                bronchi.append((hilum + (0, 5, 0), hilum + (0, 5, 0) + 0.6 * ln * d, 4.0, 2.6))
        while stack:
            a, d, ln, r, gen = stack.pop()
            b = a + ln * d
            lung_vessels.append((a, b, r))
            if gen < 4:
                perp = _unit(np.cross(d, (0, 0, 1) if gen == 0 and abs(d[2]) < 0.9 else (1, 0, 0)))
                for sgn in (-1, 1):
                    stack.append((b, _unit(d + sgn * 0.6 * perp + jit(0.1, 3)), 0.7 * ln, r * 0.7, gen + 1))
        lroi = np.array(LUNG_ROI[0][::-1])
        for p in rng.uniform((10, -100, 0), (150, 100, 255), (400, 3)) * (side, 1, 1):  # peripheral vessels
            dist = float(np.linalg.norm(p - hilum))
            d = _unit(p - hilum + jit(0.4 * dist, 3)) * rng.uniform(6, 15)
            r = float(np.clip(2.4 - dist / 80, 0.9, 2.4))
            if _seg_dist(lroi, p - d, p + d) > LUNG_ROI[1] + r + 4:
                lung_vessels.append((p - d, p + d, r))
    lv = organs["liver"][0] - ORGANS["liver"][0]  # liver shift moves its vessel tree too
    porta, ivc_top = np.array([-15.0, 15, 270]) + lv, np.array([-22.0, 20, 200]) + lv
    liver_vessels = []
    for a, pts, r in ((porta, ((-70, 35, 250), (-110, 45, 225)), 5.0),
                      (porta, ((-55, -40, 245), (-85, -60, 215)), 5.0),
                      (porta, ((10, -45, 255), (40, -60, 240)), 4.5), (ivc_top, ((-95, -5, 205),), 4.5),
                      (ivc_top, ((-40, -50, 200),), 4.0), (ivc_top, ((5, -45, 205),), 4.0)):
        for p in pts:
            b = np.add(p, lv)
            liver_vessels.append((a, b, r))
            a, r = b, r * 0.65
    an = Anatomy(sa, sb, dome_r, dome_l, organs, np.array(zs), np.array(ss), rib_z0,
                 lung_vessels, bronchi, liver_vessels, [])
    roi_c = np.array(LIVER_ROI[0][::-1])
    avoid = [organs[k] for k in ("gallbladder", "kidney_r", "stomach", "pancreas")]
    for _ in range(4000):
        if len(an.lesions) == 3:
            break
        p, r = rng.uniform((-140, -80, 195), (30, 70, 335)), float(rng.uniform(4.0, 7.5))
        c = float(rng.uniform(10, 20)) * (-1 if rng.random() < 0.7 else 1)
        if not in_liver(an, p, r + 5) or np.linalg.norm(p - roi_c) < LIVER_ROI[1] + r + 5:
            continue
        if any(_seg_dist(p, a, b) < r + rr + 5 for a, b, rr in liver_vessels):
            continue
        if any(np.sum(((p - oc) / (os + r + 12)) ** 2) < 1 for oc, os in avoid):
            continue
        if abs(p[2] - 345) < 35 or np.hypot(p[0] + 20, p[1] - 20) < r + 18:  # colon, IVC
            continue
        if all(np.linalg.norm(p - q) > r + rq + 5 for q, rq, _ in an.lesions):
            an.lesions.append((p, r, round(c)))
    return an


class Canvas:
    """One axial slice: HU and label images with 1-D voxel-centre coordinates (mm)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: float):
        self.x, self.y, self.z = x, y, float(z)
        self.hu = np.full((y.size, x.size), -1000.0, np.float32)
        self.lab = np.zeros((y.size, x.size), np.uint8)

    def box(self, x0, x1, y0, y1):
        i0, i1 = np.searchsorted(self.x, x0), np.searchsorted(self.x, x1, "right")
        j0, j1 = np.searchsorted(self.y, y0), np.searchsorted(self.y, y1, "right")
        if i1 <= i0 or j1 <= j0:
            return None
        return (slice(j0, j1), slice(i0, i1)), self.x[None, i0:i1], self.y[j0:j1, None]

    def paint(self, sl, mask, label, hu=None, where=None, masks=()):
        for m in masks:
            mask = mask & m[sl]
        if where is not None:
            mask = mask & np.isin(self.lab[sl], where)
        self.hu[sl][mask] = HU_BY_LABEL[label] if hu is None else hu
        self.lab[sl][mask] = label

    def superq(self, yc, a, b, p):
        """Full-slice |x/a|^p + |(y-yc)/b|^p (separable, cheap)."""
        return np.abs(self.y[:, None] - yc) ** p / b ** p + (np.abs(self.x) ** p / a ** p)[None, :]

    def ellipse(self, cx, cy, ax, ay, label, cond=None, **kw):
        if ax <= 0 or ay <= 0 or (bx := self.box(cx - ax, cx + ax, cy - ay, cy + ay)) is None:
            return
        sl, X, Y = bx
        m = ((X - cx) / ax) ** 2 + ((Y - cy) / ay) ** 2 <= 1.0
        self.paint(sl, m if cond is None else m & cond(X, Y), label, **kw)

    def ellipsoid(self, c, s, label, grow=0.0, **kw):
        t = (self.z - c[2]) / (s[2] + grow)
        if abs(t) < 1:
            f = math.sqrt(1 - t * t)
            self.ellipse(c[0], c[1], (s[0] + grow) * f, (s[1] + grow) * f, label, **kw)

    def capsule(self, a, b, r, label, **kw):
        a, b, z = np.asarray(a, float), np.asarray(b, float), self.z
        d = b - a
        if abs(d[2]) < 1e-9:
            t0, t1 = (0.0, 1.0) if abs(z - a[2]) <= r else (1.0, 0.0)
        else:
            t0, t1 = sorted(((z - r - a[2]) / d[2], (z + r - a[2]) / d[2]))
            t0, t1 = max(t0, 0.0), min(t1, 1.0)
        if t0 > t1:
            return
        p0, p1 = a + t0 * d, a + t1 * d
        bx = self.box(min(p0[0], p1[0]) - r, max(p0[0], p1[0]) + r, min(p0[1], p1[1]) - r, max(p0[1], p1[1]) + r)
        if bx is None:
            return
        sl, X, Y = bx
        t = np.clip(((X - a[0]) * d[0] + (Y - a[1]) * d[1] + (z - a[2]) * d[2]) / max(d @ d, 1e-9), 0, 1)
        dist2 = (X - a[0] - t * d[0]) ** 2 + (Y - a[1] - t * d[1]) ** 2 + (z - a[2] - t * d[2]) ** 2
        self.paint(sl, dist2 <= r * r, label, **kw)


RIB_SPACING, RIB_DROP = 22.5, 85.0  # posterior rib spacing; how far a rib descends anteriorly (mm)
RIB_END = (30, 30, 30, 30, 30, 30, 30, 45, 45, 45, 100, 120)  # bony end, degrees from anterior midline
FULL = (slice(None), slice(None))


def _paint_ribs(an: Anatomy, c: Canvas, cav) -> None:
    z, (yc, a, b) = c.z, cav
    zi = an.rib_z0 + RIB_SPACING * np.arange(12)
    active = [i for i in range(12) if zi[i] - 7 <= z <= zi[i] + RIB_DROP + 7]
    if not active:
        return
    jj, ii = np.nonzero((c.superq(yc, a + 1, b + 1, 2.2) >= 1) & (c.superq(yc, a + 10, b + 10, 2.2) <= 1))
    dx, dy = c.x[ii], c.y[jj] - yc
    rho = np.hypot(dx, dy) + 1e-9
    cu = -dy / rho  # cosine of the angle u from the anterior midline
    d = rho - (np.abs(dx / rho / a) ** 2.2 + np.abs(cu / b) ** 2.2) ** (-1 / 2.2) - 5.0
    u = np.degrees(np.arccos(np.clip(cu, -1, 1)))
    for i in active:
        e = (d / 4.0) ** 2 + ((z - zi[i] - RIB_DROP * (1 + cu) / 2) / 5.0) ** 2
        bone = (e <= 1) & (u <= 166)
        rib = bone & (u >= RIB_END[i])
        for m, lab in ((rib, "rib_cortex"), (rib & (e <= 0.3), "rib_marrow"),
                       (bone & (u < RIB_END[i]) & (u >= RIB_END[i] - 20) & (i < 10), "cartilage")):
            c.hu[jj[m], ii[m]] = HU_BY_LABEL[L[lab]]
            c.lab[jj[m], ii[m]] = L[lab]


def _paint_spine(an: Anatomy, c: Canvas) -> None:
    z = c.z
    j = int(np.argmin(np.abs(an.vert_z - z)))
    dz, s = abs(z - an.vert_z[j]), an.vert_s[j]
    vy, va, vb = interp(VB_Y, z), interp(VB_A, z), interp(VB_B, z)
    csx, csy = 9.0 + (va - 16) * 0.2, 7.5
    cy = vy + vb + csy + 1
    pe = L["posterior_elements"]
    c.ellipse(0, cy, csx + 5, csy + 5, pe, cond=lambda X, Y: Y >= cy - 2)
    c.ellipse(0, cy + csy + 10, 4, 10, pe)
    for sd in (-1, 1):
        c.ellipse(sd * (csx + 2), (vy + vb + cy) / 2, 3.5, (cy - vy - vb) / 2 + 2, pe)
        c.ellipse(sd * (csx + 13), cy - 1, 12 + (va - 16) * 0.3, 4.5, pe)
    c.ellipse(0, cy, csx, csy, L["canal"])
    if dz > 0.4 * s:
        c.ellipse(0, vy, va, vb, L["disc"])
    else:
        c.ellipse(0, vy, va, vb, L["cortical_bone"])
        if dz < 0.4 * s - 1.5:
            c.ellipse(0, vy, va - 2.5, vb - 2.5, L["trabecular_bone"])


def paint_slice(an: Anatomy, c: Canvas) -> None:
    """Paint the whole anatomy into one axial slice, back to front (later overwrites earlier)."""
    z = c.z
    body, mus, cav = layers(an, z)
    if (bx := c.box(-220, 220, Y_BACK + 3, Y_BACK + 11)) is not None:  # table plate
        c.paint(bx[0], np.ones(c.hu[bx[0]].shape, bool), L["table"])
    c.paint(FULL, c.superq(*body, 2.4) <= 1, L["fat"])
    c.paint(FULL, c.superq(*mus, 2.4) <= 1, L["muscle"])
    cavity = c.superq(*cav, 2.2) <= 1
    if z < min(an.dome_r, an.dome_l):
        th = np.ones_like(cavity)
    elif z >= DOME_MAX:
        th = np.zeros_like(cavity)
    else:
        th = z < dome(an, c.x[None, :], c.y[:, None])
    thc, abd = cavity & th, cavity & ~th
    c.paint(FULL, thc, L["mediastinum"])
    c.paint(FULL, abd, L["abdomen"])
    vy, vb = interp(VB_Y, z), interp(VB_B, z)
    hc, hs = an.organs["heart"]
    hx, hy, hz = hc
    if thc.any():
        for side, z0 in ((-1.0, 0.0), (1.0, 3.0)):  # lungs: apex cap, then cavity up to the diaphragm
            zz = z - z0
            if zz > 0:
                g = LUNG_APEX_GROWTH
                f = math.sqrt(max(0.0, 1 - ((g - zz) / g) ** 2)) if zz < g else 1.0
                cy = interp(((0, 70, 250), (15, -5, 0)), zz)
                c.ellipse(side * 75, cy, 80 * f, 100 * f, L["lung"], masks=(thc,))
        for i in np.nonzero(np.abs(z - an.lv_zr[:, 0]) <= an.lv_zr[:, 1])[0]:
            c.capsule(*an.lung_vessels[i], L["lung_vessel"], where=[L["lung"]])
        air_ok = [L["lung"], L["lung_vessel"], L["mediastinum"]]
        for a, b, ro, ri in an.bronchi:
            c.capsule(a, b, ro, L["airway_wall"], where=air_ok)
            c.capsule(a, b, ri, L["airway"], where=air_ok + [L["airway_wall"]])
        front, w = cav[0] - cav[2], interp(((0, 60, 100, 140), (20, 18, 22, 26)), z)
        ym, h = (front + vy) / 2, (vy - front) / 2
        if (bx := c.box(-w, w, front, vy)) is not None:  # mediastinal band between the lungs
            sl, X, Y = bx
            c.paint(sl, (X / w) ** 4 + ((Y - ym) / h) ** 4 <= 1, L["mediastinum"], masks=(thc,))
        c.ellipsoid(hc, hs, L["pericardial_fat"], grow=5, masks=(thc,))
        c.ellipsoid(hc, hs, L["myocardium"], masks=(thc,))
        for off, semi, lab in (((20, 5, 5), (25, 22, 32), "blood"), ((-20, -20, 5), (28, 18, 30), "vein"),
                               ((0, 35, -30), (28, 18, 18), "blood"), ((-50, 10, 10), (22, 25, 30), "vein")):
            c.ellipsoid(np.add(hc, off), semi, L[lab], where=[L["myocardium"]])
        bl = L["blood"]
        if 72 <= z <= hz - 35:
            c.ellipse(hx - 18, hy + 5, 15, 15, bl, masks=(thc,))
        arch = [(hx - 18, hy + 5, 72), (hx - 8, hy + 15, 60), (hx + 8, hy + 30, 60), (24, 10, 64),
                (22, interp(VB_Y, 75) - interp(VB_B, 75) - 14, 75)]
        for p, q in zip(arch[:-1], arch[1:]):
            c.capsule(p, q, 13, bl, masks=(th,))
        pt = (hx, hy + 5, 100)
        c.capsule((hx - 5, hy - 10, hz - 45), pt, 13, bl, masks=(thc,))
        c.capsule(pt, (45, 0, 108), 10, bl, masks=(thc,))
        c.capsule(pt, (-45, 0, 112), 10, bl, masks=(thc,))
        if z < hz - 30:
            c.ellipse(-25, -18, 10, 10, L["vein"], masks=(th,))
        if z < 62:
            for x0, y0, r in ((-12, -22, 7), (2, -18, 5), (15, -5, 5)):
                c.ellipse(x0, y0, r, r, bl, masks=(th,))
        if z < 95:  # trachea
            ty = interp(((-50, 95), (2, 12)), z)
            c.ellipse(0, ty, 10, 10, L["airway_wall"], masks=(th,))
            c.ellipse(0, ty, 8, 8, L["airway"], masks=(th,))
        if z < 235:  # oesophagus with a little air
            ox, oy = interp(((0, 180, 235), (3, 3, 30)), z), interp(((0, 180, 235), (28, 26, 5)), z)
            c.ellipse(ox, oy, 8, 8, L["mediastinum"], masks=(th,))
            c.ellipse(ox, oy, 2.5, 2.5, L["gas"], masks=(th,))
    if abd.any():
        c.paint(FULL, abd & (c.y[:, None] < cav[0] - cav[2] + 15), L["visceral_fat"])
        m = dict(masks=(abd,))
        lc, ls = an.organs["liver"]
        c.ellipsoid(lc, ls, L["liver"], cond=lambda X, Y: _liver_cut(X, Y) < 0, **m)
        for a, b, r in an.liver_vessels:
            c.capsule(a, b, r, L["liver_vessel"], where=[L["liver"]])
        for k in ("gallbladder", "spleen", "pancreas"):
            c.ellipsoid(*an.organs[k], L[k], **m)
        sc, ss = an.organs["stomach"]
        c.ellipsoid(sc, ss, L["bowel_wall"], **m)
        c.ellipsoid(sc, ss, L["gastric_fluid"], grow=-4, where=[L["bowel_wall"]])
        c.ellipsoid(sc, ss, L["gas"], grow=-4, cond=lambda X, Y: Y < sc[1] - 12, where=[L["gastric_fluid"]])
        for k in ("kidney_r", "kidney_l"):
            kc, ks = an.organs[k]
            c.ellipsoid(kc, ks, L["perirenal_fat"], grow=10, masks=(cavity,))
            c.ellipsoid(kc, ks, L["kidney"], masks=(cavity,))
            c.ellipsoid(kc - (np.sign(kc[0]) * 14, 3, 0), (9, 9, 25), L["renal_sinus"], where=[L["kidney"]])
        colon = [(-100, -45, 345), (-20, -60, 335), (80, -50, 330), (110, 10, 300), (110, 10, 700)]
        for p, q in zip(colon[:-1], colon[1:]):
            c.capsule(p, q, 16, L["bowel_wall"], **m)
            c.capsule(p, q, 12, L["gas"], where=[L["bowel_wall"]])
        for p, r, con in an.lesions:
            c.ellipsoid(p, (r, r, r), L["lesion"], hu=HU_BY_LABEL[L["liver"]] + con,
                        where=[L["liver"], L["liver_vessel"]])
        if z > hz + 30:
            c.ellipse(-22, 20, 11, 11, L["vein"], masks=(cavity,))
        if z > 280:  # psoas muscles
            w, va = min(22.0, (z - 280) * 0.25), interp(VB_A, z)
            for sd in (-1, 1):
                c.ellipse(sd * (va + 0.8 * w + 2), vy, w, 16 * min(1.0, w / 10), L["muscle"], masks=(cavity,))
    if z >= 75:  # descending aorta
        r = interp(((75, 350), (13, 10)), z)
        ax = interp(((75, 180, 260, 350), (22, 20, 10, 5)), z)
        c.ellipse(ax, vy - vb - r - 1, r, r, L["blood"], masks=(cavity,))
    _paint_spine(an, c)
    _paint_ribs(an, c, cav)
    if 30 <= z <= 212:  # sternum
        w, ys = interp(((30, 60, 70, 190, 212), (25, 25, 14, 14, 7)), z), cav[0] - cav[2] - 7
        c.ellipse(0, ys, w, 6, L["rib_cortex"])
        c.ellipse(0, ys, w - 2, 4, L["rib_marrow"])
