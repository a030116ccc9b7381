"""Draw a synthetic AP hip radiograph (proximal femur, pelvis rim, thigh) from body parameters.

The synthetic hospitals need images in which muscle mass and bone density are *visible*, so
that an image model can learn what the clinical table cannot tell it. A radiograph is a
projection: a pixel's brightness is the attenuation summed along the ray. Every structure here
is a capsule or a sphere, and the path length of a ray through one at distance ``d`` from its
axis is the chord ``2*sqrt(R^2 - d^2)``; summing chord x attenuation over the structures gives
soft, realistic edges (a thick muscle band is both wider and brighter in the middle) with a few
vectorised numpy operations per image (~1 ms at 128 px).

Layout (the patient's right hip as displayed, viewer's left = lateral): the femoral shaft runs
down the image slightly adducted, surrounded by the thigh muscle cylinder and the subcutaneous
fat layer with air at the lateral edge; the head sits in the acetabulum at the top, the neck
and greater trochanter join it to the shaft, and the iliac rim and pubic ramus are at the top
right. Geometry is in pixels of a 128 px reference image; ``render_hip`` scales it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

REF_SIZE = 128.0


@dataclass(frozen=True)
class BodyParams:
    """What the image shows about one patient (all drawn by the latent model in synth.py).

    muscle_radius: thigh muscle cylinder radius, reference px (muscle mass).
    muscle_density: attenuation factor of muscle, ~0.8-1.1 (lower = fatty infiltration).
    fat_thickness: subcutaneous fat layer, reference px.
    bone_density: cortical thickness and trabecular brightness factor, ~0.5-1.5.
    bone_scale: skeleton size factor (taller patients have bigger bones), ~0.9-1.1.
    shift_x, shift_y, angle_deg, zoom: positioning of the patient on the detector.
    """

    muscle_radius: float
    muscle_density: float
    fat_thickness: float
    bone_density: float
    bone_scale: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    angle_deg: float = 0.0
    zoom: float = 1.0


# attenuation per reference pixel of path (display scale: sum ~2.5 in the thickest bone)
_MU_FAT = 0.0055
_MU_MUSCLE = 0.0125
_MU_CORTEX = 0.075
_MU_TRABECULAR = 0.028


def _segment_distance(x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]) -> np.ndarray:
    """Distance of every pixel to the segment p0-p1 (the axis of a capsule)."""
    ax, ay = p0
    dx, dy = p1[0] - ax, p1[1] - ay
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(x - ax - t * dx, y - ay - t * dy)


def _chord(radius: float, dist: np.ndarray) -> np.ndarray:
    """Path length of a ray at ``dist`` from the axis through a cylinder/sphere of ``radius``."""
    return 2.0 * np.sqrt(np.maximum(float(radius) ** 2 - np.square(dist), 0.0))


def _bone(dist: np.ndarray, radius: float, cortex: float, density: float) -> np.ndarray:
    """Attenuation of a bone: a dense cortical shell around a trabecular core."""
    inner = max(radius - cortex, 0.5)
    core = _chord(inner, dist)
    shell = _chord(radius, dist) - core
    return _MU_CORTEX * density * shell + _MU_TRABECULAR * density * core


def render_hip(p: BodyParams, size: int, scale: float = 1.0) -> np.ndarray:
    """Return the ideal (noise-free) radiograph, float32 [size, size], 0 = air, ~1 = densest bone.

    ``scale`` is the scanner's magnification (reference pixel spacing / this scanner's spacing),
    so anatomy keeps its physical size when the pixel spacing differs between sites.
    """
    k = REF_SIZE / size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # detector pixel -> anatomy frame (reference px): undo zoom, rotation and shift about the centre
    c = REF_SIZE / 2.0
    u = (xx + 0.5) * k - c
    v = (yy + 0.5) * k - c
    cos, sin = math.cos(math.radians(p.angle_deg)), math.sin(math.radians(p.angle_deg))
    z = scale * p.zoom
    x = (cos * u + sin * v) / z + c - p.shift_x
    y = (-sin * u + cos * v) / z + c - p.shift_y

    b = p.bone_scale
    # soft tissue: thigh cylinder (muscle core + fat shell) and the gluteal/pelvic mass above it
    thigh = _segment_distance(x, y, (58.0, -40.0), (68.0, 170.0))
    r_muscle = p.muscle_radius
    r_skin = r_muscle + p.fat_thickness
    muscle_path = _chord(r_muscle, thigh)
    fat_path = _chord(r_skin, thigh) - muscle_path
    pelvis_soft = _segment_distance(x, y, (70.0, -60.0), (150.0, -20.0))
    pelvis_path = _chord(r_skin + 20.0, pelvis_soft)
    att = _MU_MUSCLE * p.muscle_density * muscle_path + _MU_FAT * fat_path
    att = np.maximum(att, 0.75 * _MU_MUSCLE * pelvis_path)

    # femur: shaft, neck, head, trochanters; cortex thickness follows bone density
    d = p.bone_density
    r_shaft = 7.5 * b
    cortex = r_shaft * float(np.clip(0.16 + 0.12 * d, 0.12, 0.45))
    att = att + _bone(_segment_distance(x, y, (50.0, 44.0), (60.0, 170.0)), r_shaft, cortex, d)
    head = (84.0, 24.0)
    head_dist = np.hypot(x - head[0], y - head[1])
    att = att + _bone(head_dist, 12.0 * b, 0.5 * cortex, d)
    # the neck starts at the head's rim so the two do not double up
    att = att + _bone(_segment_distance(x, y, (75.0, 30.0), (53.0, 46.0)), 6.5 * b, 0.6 * cortex, d)
    att = att + _bone(np.hypot(x - 46.0, y - 40.0), 9.0 * b, 0.5 * cortex, 0.8 * d)
    att = att + _bone(np.hypot(x - 63.0, y - 60.0), 4.0 * b, 0.5 * cortex, 0.8 * d)

    # pelvis: acetabular roof (an arc over the head), iliac wing and rim, pubic ramus
    roof_r = 15.5 * b
    roof = np.abs(head_dist - roof_r)
    above = (y < head[1] + 4.0) & (x > head[0] - 16.0)
    att = att + np.where(above, _MU_CORTEX * d * 0.6 * _chord(2.5, roof), 0.0)
    ilium = _segment_distance(x, y, (92.0, 6.0), (150.0, -30.0))
    att = att + 0.5 * _MU_TRABECULAR * d * _chord(14.0, ilium)
    rim = _segment_distance(x, y, (70.0, 2.0), (96.0, -6.0))
    att = att + _MU_CORTEX * d * 0.5 * _chord(2.2, rim)
    att = att + _bone(_segment_distance(x, y, (100.0, 46.0), (150.0, 54.0)), 6.0 * b, 0.4 * cortex, 0.8 * d)
    return np.clip(att / 2.6, 0.0, 1.0)
