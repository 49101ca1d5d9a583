"""Object tracks from the pixels of a physics-world video: each object is found by its colour.

The renderer (data_pipelines/physics_world/render.py) paints every object in one flat colour
(balls also carry a spoke in a darker shade of it) over a flat background, with one pixel of
anti-aliasing: an edge pixel is background + coverage * (colour - background). So a pixel's
share of an object, its alpha, is its projection onto the line from the background to the
object's colour; weighting pixels by alpha gives the object's area and a sub-pixel centroid
(the centre of mass of a ball or box, which is its recorded position).

Each pixel is explained by the nearest of the colour lines the renderer can produce (the
background to a colour, a colour to its spoke's shade, two colours meeting at an edge), over
every object and scenery colour of the physics world, used in the scene or not: so the grey
ground does not count as half of a white ball, and a colour the scene lacks claims its own
pixels. A generated video's colours drift and blur; `tolerance` is how far (RGB units) a
pixel may lie off every line and still count. Only shares next to an object's solid core
count, which keeps stray look-alike pixels elsewhere in the frame out of its centroid.
"""
import dataclasses

import numpy as np
from scipy import ndimage

from data_pipelines.physics_world.scenes import COLORS, SCENERY_COLORS

DARK_SHADE = 0.55  # scenes._darker: the shade of a ball's spoke
CORE_SHARE = 0.75  # a pixel this much of one colour is inside its object, not on an edge
CORE_REACH = 2  # pixels: anti-aliasing spreads one pixel, a generated video's blur a little more


@dataclasses.dataclass(frozen=True)
class Tracks:
  """position (T, N, 2) pixels, x right and y down from the top-left corner, as the recorded
  states; NaN where the object is absent. area (T, N) in pixels (alpha-weighted)."""
  position: np.ndarray
  area: np.ndarray
  present: np.ndarray  # bool (T, N): area >= min_area


def object_colors(object_names) -> np.ndarray:
  """(N, 3) RGB of each object, from the colour word in its name ('small red ball')."""
  colors = []
  for name in object_names:
    name = name.decode() if isinstance(name, bytes) else str(name)
    words = [w for w in name.split() if w in COLORS]
    if not words:
      raise ValueError(f'no colour of {sorted(COLORS)} in object name {name!r}')
    colors.append(COLORS[words[0]])
  return np.asarray(colors, np.float32)


def background_color(frame: np.ndarray) -> np.ndarray:
  """The most common colour of a frame (the background fills most of every scene)."""
  values, counts = np.unique(frame.reshape(-1, 3), axis=0, return_counts=True)
  return values[np.argmax(counts)].astype(np.float32)


def _segment(pixels, squared, start, end):
  """Distance of each pixel (P, 3) to the RGB segment start -> end, and where along it (0..1).

  Expanded into dot products (squared: |pixel|^2) so that a segment costs two matrix-vector
  products; float64 keeps the expansion exact enough to tell a colour from a blend near it.
  """
  direction = end - start
  length2 = max(float(direction @ direction), 1e-6)
  projection = pixels @ direction - start @ direction  # (pixel - start) . direction
  along = np.clip(projection / length2, 0.0, 1.0)
  offset2 = squared - 2 * (pixels @ start) + start @ start
  distance2 = offset2 - 2 * along * projection + along ** 2 * length2
  return np.sqrt(np.maximum(distance2, 0.0)), along


def color_weights(video, colors, background, tolerance=40.0, min_alpha=0.2, single=None):
  """Per-pixel share of each colour in `colors`: float32 (len(colors), T, H, W).

  A pixel is explained by the nearest of these RGB segments: background to a colour (an edge
  over the background: the colour's share is the alpha along it), a colour to its spoke shade
  (all of it the colour's), and one colour to another of `colors` or of the scenery (an edge
  where two shapes meet: shared by position along it). The colours are `colors` plus every
  other colour the physics world paints, used in the scene or not, so that a pixel of a colour
  the scene lacks is claimed by that colour and not by a neighbour of it. Pixels farther than
  `tolerance` from every segment, and shares below `min_alpha`, count for nothing: faint blur
  and noise in a generated video would otherwise pull every centroid towards the middle.
  single: bool per colour, True where one object has the colour (default: all), so that only
  its largest solid blob in each frame counts (see _near_core).
  """
  shape = np.shape(video)[:-1]
  pixels = np.asarray(video, np.float64).reshape(-1, 3)
  squared = np.einsum('pc,pc->p', pixels, pixels)
  background = np.asarray(background, np.float64)
  colors = np.asarray(colors, np.float32).reshape(-1, 3)
  known = {tuple(c) for c in colors}
  scenery = [np.float32(c) for c in SCENERY_COLORS.values() if tuple(np.float32(c)) not in known]
  absent = [np.float32(c) for c in COLORS.values() if tuple(np.float32(c)) not in known]
  palette = list(colors) + scenery + absent
  blending = len(colors) + len(scenery)  # colours present in the scene, which edges may mix
  # segments as (start, end, owner of the start or -1, owner of the end or -1)
  segments = []
  for i, color in enumerate(palette):
    owner = i if i < len(colors) else -1
    segments += [(background, color, -1, owner), (color, DARK_SHADE * color, owner, owner)]
  for i in range(blending):
    for j in range(i + 1, blending):
      segments.append((palette[i], palette[j], i if i < len(colors) else -1,
                       j if j < len(colors) else -1))
  best = np.full(len(pixels), np.inf)
  share = np.zeros((len(colors), len(pixels)), np.float32)
  for start, end, owner_start, owner_end in segments:
    distance, along = _segment(pixels, squared, np.float64(start), np.float64(end))
    nearer = distance < best
    best = np.where(nearer, distance, best)
    share *= ~nearer  # a nearer segment takes the pixel from the earlier ones
    if owner_start >= 0:
      share[owner_start] += np.where(nearer, 1.0 - along, 0.0)
    if owner_end >= 0:
      share[owner_end] += np.where(nearer, along, 0.0)
  share = np.where(best <= tolerance, share, 0.0).reshape((len(colors),) + shape)
  share = np.where(share >= min_alpha, share, 0.0)
  single = np.ones(len(colors), bool) if single is None else np.asarray(single)
  return _near_core(share, single).astype(np.float32)


def _near_core(share, single):
  """Keeps the shares near an object's solid core.

  Edges of different colours can line up: half of a white edge is grey, the scenery's
  colour, and a pixel where a ramp, the ground and the background meet may lie near some
  ball's line. An object's edge pixels lie next to its core (share >= CORE_SHARE), so only
  shares within CORE_REACH pixels of a core pixel count; and a colour that one object owns
  keeps only the largest core blob of each frame (noise on the grey ground can make a few
  pixels look white).
  """
  core = share >= CORE_SHARE
  for i in np.nonzero(single)[0]:
    for t in range(core.shape[1]):
      labels, count = ndimage.label(core[i, t], structure=np.ones((3, 3)))
      if count > 1:
        sizes = ndimage.sum(share[i, t], labels, index=np.arange(1, count + 1))
        core[i, t] = labels == 1 + int(np.argmax(sizes))
  reach = np.zeros((1, 1, 3, 3), bool)
  reach[0, 0] = True  # within one frame: 8-neighbours, grown CORE_REACH times
  near_core = ndimage.binary_dilation(core, structure=reach, iterations=CORE_REACH)
  return np.where(near_core, share, 0.0)


def track_objects(video, colors, background, tolerance=40.0, min_alpha=0.2,
                  min_area=1.0) -> Tracks:
  """Tracks of objects given their colours (N, 3): alpha-weighted centroid per frame.

  Objects that share a colour (the grains of a spill) get the centroid of all of them; use
  `unique_colors` to know which tracks are single objects.
  """
  colors = np.asarray(colors, np.float32).reshape(-1, 3)
  distinct, which, counts = np.unique(colors, axis=0, return_inverse=True, return_counts=True)
  weights = color_weights(video, distinct, background, tolerance, min_alpha, counts == 1)
  return tracks_from_weights(weights[which.ravel()], min_area)


def tracks_from_weights(weights, min_area=1.0) -> Tracks:
  """Tracks from per-object pixel weights (N, T, H, W), as color_weights gives them."""
  _, _, height, width = weights.shape
  area = weights.sum(axis=(2, 3))  # (N, T)
  cols = np.arange(width, dtype=np.float32) + 0.5  # pixel centres, as the renderer samples
  rows = np.arange(height, dtype=np.float32) + 0.5
  with np.errstate(invalid='ignore', divide='ignore'):
    x = (weights.sum(axis=2) * cols).sum(axis=-1) / area
    y = (weights.sum(axis=3) * rows).sum(axis=-1) / area
  present = area >= min_area
  position = np.where(present[..., None], np.stack([x, y], axis=-1), np.nan)
  return Tracks(position.transpose(1, 0, 2), area.T, present.T)


def unique_colors(colors) -> np.ndarray:
  """bool (N,): the object is the only one of its colour, so its track is its own."""
  colors = np.asarray(colors).reshape(-1, 3)
  _, which, counts = np.unique(colors, axis=0, return_inverse=True, return_counts=True)
  return counts[which.ravel()] == 1
