"""Rasterises a pymunk scene into an RGB uint8 frame, with numpy only.

Every shape is drawn from its signed distance (negative inside): coverage = clip(0.5 - d, 0, 1)
gives one pixel of anti-aliasing for circles, capsules (pymunk segments, joint rods) and convex
polygons alike. A pixel belongs to the last object whose shape covers its centre (d <= 0); an
object is visible when it owns at least one pixel, so an object hidden behind an occluder or
outside the frame is not visible.

Coordinates are pymunk's, which the scenes lay out in pixels with y pointing down, so a world
point (x, y) is drawn at column x, row y.
"""
import dataclasses

import numpy as np
import pymunk


@dataclasses.dataclass(frozen=True)
class Link:
  """A rod drawn between two body-local points (joints, springs, a ball's spoke)."""
  body_a: pymunk.Body
  anchor_a: tuple[float, float]
  body_b: pymunk.Body
  anchor_b: tuple[float, float]
  radius: float


@dataclasses.dataclass(frozen=True)
class Drawable:
  item: pymunk.Shape | Link
  color: tuple[int, int, int]
  owner: int = -1  # index of the object it belongs to; -1 for scenery (ground, walls, rods)


def _segment_distance(px, py, a, b, radius):
  ab = np.subtract(b, a)
  length2 = max(float(ab @ ab), 1e-12)
  t = np.clip(((px - a[0]) * ab[0] + (py - a[1]) * ab[1]) / length2, 0.0, 1.0)
  return np.hypot(px - a[0] - t * ab[0], py - a[1] - t * ab[1]) - radius


def _polygon_distance(px, py, vertices):
  """Max over edges of the signed distance to the edge's line: exact inside a convex polygon
  and close enough outside it for a one-pixel anti-aliased edge."""
  v = np.asarray(vertices)
  edges = np.roll(v, -1, axis=0) - v
  normals = np.stack([edges[:, 1], -edges[:, 0]], axis=1)
  normals /= np.linalg.norm(normals, axis=1, keepdims=True)
  if (v[:, 0] * np.roll(v[:, 1], -1) - np.roll(v[:, 0], -1) * v[:, 1]).sum() < 0:
    normals = -normals  # the vertices wind the other way: flip the normals to point outward
  distance = np.full(np.broadcast(px, py).shape, -np.inf)
  for (nx, ny), (vx, vy) in zip(normals, v):
    distance = np.maximum(distance, (px - vx) * nx + (py - vy) * ny)
  return distance


def _geometry(item):
  """World-space (kind, parameters, bounding box) of a shape or link."""
  if isinstance(item, Link):
    a = tuple(item.body_a.local_to_world(item.anchor_a))
    b = tuple(item.body_b.local_to_world(item.anchor_b))
    return 'segment', (a, b, item.radius), _box([a, b], item.radius)
  body = item.body
  if isinstance(item, pymunk.Circle):
    centre = tuple(body.local_to_world(item.offset))
    return 'circle', (centre, item.radius), _box([centre], item.radius)
  if isinstance(item, pymunk.Segment):
    a, b = tuple(body.local_to_world(item.a)), tuple(body.local_to_world(item.b))
    return 'segment', (a, b, item.radius), _box([a, b], item.radius)
  vertices = [tuple(body.local_to_world(v)) for v in item.get_vertices()]
  return 'polygon', (vertices,), _box(vertices, 0.0)


def _box(points, radius):
  p = np.asarray(points)
  return p.min(axis=0) - radius - 1, p.max(axis=0) + radius + 1


def _distance(kind, params, px, py):
  if kind == 'circle':
    (cx, cy), radius = params
    return np.hypot(px - cx, py - cy) - radius
  if kind == 'segment':
    return _segment_distance(px, py, *params)
  return _polygon_distance(px, py, *params)


def render(drawables, width, height, background, num_objects):
  """Draws `drawables` in order (later ones in front).

  Returns the frame, uint8 (height, width, 3), and visible, bool (num_objects,).
  """
  frame = np.empty((height, width, 3), np.float32)
  frame[:] = background
  owner = np.full((height, width), -1, np.int32)
  for drawable in drawables:
    kind, params, (low, high) = _geometry(drawable.item)
    x0, y0 = max(int(np.floor(low[0])), 0), max(int(np.floor(low[1])), 0)
    x1, y1 = min(int(np.ceil(high[0])), width), min(int(np.ceil(high[1])), height)
    if x0 >= x1 or y0 >= y1:
      continue  # entirely outside the frame
    py, px = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5  # pixel centres
    distance = _distance(kind, params, px, py)
    coverage = np.clip(0.5 - distance, 0.0, 1.0)[..., None]
    patch = frame[y0:y1, x0:x1]
    patch += coverage * (np.asarray(drawable.color, np.float32) - patch)
    owner[y0:y1, x0:x1][distance <= 0] = drawable.owner
  visible = np.bincount(owner[owner >= 0], minlength=num_objects)[:num_objects] > 0
  return np.round(frame).astype(np.uint8), visible
