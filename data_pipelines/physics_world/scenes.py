"""The scene families: each lays out a pymunk space for one clip and knows how to caption it.

Units: the world is laid out in pixels of the clip's frame, x to the right and y down with the
origin at the top-left corner, so pymunk's positions are image coordinates as they are and
gravity (0, g) with g > 0 pulls down the image. Time is in seconds. Each family scales gravity
and speeds to the frame size and the clip's duration (gravity ~ height / duration^2), so that
the event the caption names happens within the clip whatever its length and fps.

Static scenery (ground, walls, ramps, shelves, anchors) and the kinematic cup have elasticity
1 and friction 1: pymunk multiplies the two shapes' coefficients, so a contact with scenery
uses the moving object's own elasticity and friction, the values stored in the record.

Families (SCENES): drop, collide, ramp, stack, pendulum, spill, occlude.
"""
import dataclasses
from typing import Callable

import numpy as np
import pymunk

from data_pipelines.physics_world.render import Drawable, Link

COLORS = {
    'red': (220, 50, 47), 'green': (80, 180, 60), 'blue': (50, 110, 225),
    'yellow': (235, 200, 40), 'orange': (240, 130, 30), 'purple': (150, 80, 200),
    'cyan': (40, 190, 200), 'pink': (235, 120, 170), 'white': (235, 235, 235),
}
SCENERY_COLORS = {'gray': (125, 125, 125), 'brown': (135, 95, 60)}


@dataclasses.dataclass
class SceneObject:
  name: str  # what the caption calls it: 'small red ball'
  body: pymunk.Body
  mass: float  # 0 for static and kinematic bodies (infinite mass)
  elasticity: float
  friction: float


class Scene:
  """A pymunk space with the objects whose ground truth is recorded, and how to draw it."""

  def __init__(self, family: str, width: int, height: int, gravity: float):
    self.family = family
    self.width, self.height = width, height
    self.unit = min(width, height)  # sizes are fractions of the short side
    self.space = pymunk.Space()
    self.space.gravity = (0.0, gravity)
    self.space.iterations = 30  # stacks need more solver iterations than the default 10
    self.objects: list[SceneObject] = []
    self.drawables: list[Drawable] = []  # in drawing order, back to front
    self.agent = -1  # index of the object that actions push; -1 when none can be pushed
    # caption(position (T, N, 2), angle (T, N), visible (T, N)) -> str, from params and outcome
    self.caption: Callable[..., str] = lambda *_: family
    # called with the time in seconds before every physics step; moves kinematic bodies
    self.drive: Callable[[float], None] = lambda time: None

  def add_object(self, name, body, shapes, color, mass=0.0, elasticity=1.0, friction=1.0):
    for shape in shapes:
      shape.elasticity, shape.friction = elasticity, friction
    self.space.add(body, *shapes)
    self.objects.append(SceneObject(name, body, mass, elasticity, friction))
    index = len(self.objects) - 1
    self.drawables += [Drawable(shape, color, index) for shape in shapes]
    return index

  def add_ball(self, name, color, position, radius, mass, elasticity, friction,
               velocity=(0.0, 0.0), angular_velocity=0.0):
    body = pymunk.Body(mass, pymunk.moment_for_circle(mass, 0, radius))
    body.position, body.velocity = _vec(position), _vec(velocity)
    body.angular_velocity = float(angular_velocity)
    index = self.add_object(name, body, [pymunk.Circle(body, radius)], COLORS[color], mass,
                            elasticity, friction)
    if radius >= 3:  # a darker spoke shows the ball's rotation (rolling vs sliding)
      spoke = Link(body, (0.0, 0.0), body, (0.7 * radius, 0.0), 0.2 * radius)
      self.drawables.append(Drawable(spoke, _darker(COLORS[color]), index))
    return index

  def add_box(self, name, color, position, size, mass, elasticity, friction, angle=0.0,
              velocity=(0.0, 0.0)):
    body = pymunk.Body(mass, pymunk.moment_for_box(mass, size))
    body.position, body.angle, body.velocity = _vec(position), float(angle), _vec(velocity)
    return self.add_object(name, body, [pymunk.Poly.create_box(body, size)], COLORS[color], mass,
                           elasticity, friction)

  def add_scenery(self, shape, color):
    """Static geometry that is drawn but not recorded as an object."""
    shape.elasticity = shape.friction = 1.0
    self.space.add(shape)
    self.drawables.append(Drawable(shape, color))

  def add_ground(self, rng) -> tuple[float, str]:
    """A floor across the bottom of the frame; returns its top y and its colour name."""
    top = self.height * (1 - rng.uniform(0.08, 0.15))
    color = rng.choice(list(SCENERY_COLORS))
    w, h = self.width, self.height
    self.add_scenery(pymunk.Poly(self.space.static_body, [(-w, top), (2 * w, top),
                                                         (2 * w, top + h), (-w, top + h)]),
                     SCENERY_COLORS[color])
    return top, color

  def mass(self, radius_or_size, density):
    """Mass from area; density ~1 gives masses ~1 for a typical object."""
    size = np.atleast_1d(radius_or_size)
    area = np.pi * size[0] ** 2 if size.size == 1 else size[0] * size[1]
    return float(density * area / (0.01 * self.unit ** 2))


def _static_poly(vertices):
  """A static body at the polygon's centroid, so its recorded position is the shape's centre."""
  centre = np.mean(vertices, axis=0)
  body = pymunk.Body(body_type=pymunk.Body.STATIC)
  body.position = _vec(centre)
  return body, pymunk.Poly(body, [_vec(np.subtract(v, centre)) for v in vertices])


def _a(phrase):
  return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _vec(v):
  return float(v[0]), float(v[1])  # pymunk takes tuples of Python floats, not numpy arrays


def _darker(color):
  return tuple(int(c * 0.55) for c in color)


def _pick_colors(rng, count):
  return [str(c) for c in rng.choice(list(COLORS), size=count, replace=False)]


def _ball_radius(rng, unit, sizes=('small', 'medium', 'large')):
  size = str(rng.choice(sizes))
  low, high = {'small': (0.045, 0.065), 'medium': (0.07, 0.085), 'large': (0.09, 0.12)}[size]
  return size, max(rng.uniform(low, high) * unit, 1.5)


def _named(size, color, kind):
  return f'{size} {color} {kind}' if size != 'medium' else f'{color} {kind}'


def _listing(items):
  return items[0] if len(items) == 1 else ', '.join(items[:-1]) + ' and ' + items[-1]


def _side_word(sign):
  return 'right' if sign > 0 else 'left'


def drop(rng, width, height, duration):
  """One to three objects fall from rest onto the ground and bounce; object 0 is a ball."""
  scene = Scene('drop', width, height, gravity=rng.uniform(4, 10) * height / duration ** 2)
  _, ground_color = scene.add_ground(rng)
  count = int(rng.integers(1, 4))
  lane = width / count  # one lane each, so the objects fall without hitting each other
  lanes = rng.permutation(count)
  clauses = []
  for i, color in enumerate(_pick_colors(rng, count)):
    size, radius = _ball_radius(rng, scene.unit)
    radius = min(radius, 0.4 * lane)
    x = (lanes[i] + rng.uniform(0.4, 0.6)) * lane
    y = max(rng.uniform(0.08, 0.4) * height, radius + 1)
    elasticity, friction = rng.uniform(0.3, 0.95), rng.uniform(0.2, 0.9)
    if i > 0 and rng.random() < 0.3:
      box = (2 * radius, 2 * radius * rng.uniform(0.6, 1.0))
      name = _named(size, color, 'box')
      scene.add_box(name, color, (x, y), box, scene.mass(box, rng.uniform(0.5, 2)), elasticity,
                    friction, angle=rng.uniform(-0.5, 0.5))
    else:
      name = _named(size, color, 'ball')
      scene.add_ball(name, color, (x, y), radius, scene.mass(radius, rng.uniform(0.5, 2)),
                     elasticity, friction)
    bounce = ('bounces high' if elasticity > 0.75 else
              'bounces' if elasticity > 0.5 else 'barely bounces')
    onto = f' onto the {ground_color} ground' if i == 0 else ''
    clauses.append(f'{_a(name)} falls{onto} and {bounce}')
  scene.agent = 0
  scene.caption = lambda *_: '; '.join(clauses)
  return scene


def collide(rng, width, height, duration):
  """Seen from above (no gravity): two to four bodies of different mass and elasticity slide
  towards a common point inside a walled table and collide."""
  scene = Scene('collide', width, height, gravity=0.0)
  wall = max(2.0, 0.04 * scene.unit)
  wall_color = SCENERY_COLORS[rng.choice(list(SCENERY_COLORS))]
  w, h, r = width, height, wall / 2
  for a, b in [((0, r), (w, r)), ((0, h - r), (w, h - r)),
               ((r, 0), (r, h)), ((w - r, 0), (w - r, h))]:
    scene.add_scenery(pymunk.Segment(scene.space.static_body, a, b, r), wall_color)
  target = np.array([w, h]) / 2 + rng.normal(0, 0.08, 2) * scene.unit
  placed, descriptions = [], []
  for color in _pick_colors(rng, int(rng.integers(2, 5))):
    size, radius = _ball_radius(rng, scene.unit)
    for _ in range(50):  # rejection sampling of a free spot
      margin = wall + radius + 1
      position = rng.uniform([margin, margin], [w - margin, h - margin])
      if all(np.linalg.norm(position - p) > radius + q + 2 for p, q in placed):
        break
    else:
      continue
    placed.append((position, radius))
    heavy = rng.random() < 0.5
    density = rng.uniform(2.5, 5) if heavy else rng.uniform(0.3, 0.8)
    elasticity, friction = rng.uniform(0.2, 1.0), rng.uniform(0.1, 0.8)
    offset = target - position
    velocity = offset / rng.uniform(0.3, 0.6) / duration  # reaches the target at 30-60%
    if rng.random() < 0.3:
      name, box = _named(size, color, 'box'), (1.6 * radius, 1.6 * radius)
      scene.add_box(name, color, position, box, scene.mass(box, density), elasticity, friction,
                    angle=rng.uniform(0, np.pi / 2), velocity=velocity)
    else:
      name = _named(size, color, 'ball')
      scene.add_ball(name, color, position, radius, scene.mass(radius, density), elasticity,
                     friction, velocity=velocity)
    bounce = 'bouncy ' if elasticity > 0.7 else 'soft ' if elasticity < 0.4 else ''
    descriptions.append(f"{'heavy' if heavy else 'light'} {bounce}{name}")

  contacts = []  # object pairs in the order they first touch

  def record_contact(arbiter, space, data):
    owners = tuple(sorted(shape_owner.get(s, -1) for s in arbiter.shapes))
    if owners[0] >= 0 and owners not in contacts:
      contacts.append(owners)

  shape_owner = {d.item: d.owner for d in scene.drawables if isinstance(d.item, pymunk.Shape)}
  scene.space.on_collision(begin=record_contact)

  def caption(*_):
    text = f'seen from above, {_listing([_a(d) for d in descriptions])} slide across a table'
    if not contacts:
      return text + ' and miss each other'
    names = [o.name for o in scene.objects]
    hits = [f'the {names[a]} hits the {names[b]}' for a, b in contacts[:3]]
    return text + '; ' + ', then '.join(hits)

  scene.agent = 0
  scene.caption = caption
  return scene


def ramp(rng, width, height, duration):
  """A ball rolls, or a box slides (or sticks, when friction beats the slope), down a ramp;
  half the time it is first dropped onto the slope."""
  scene = Scene('ramp', width, height, gravity=rng.uniform(5, 10) * height / duration ** 2)
  ground, _ = scene.add_ground(rng)
  side = rng.choice([-1, 1])  # +1: the high end is on the left, so things go down to the right
  length = rng.uniform(0.45, 0.7) * width
  rise = min(length * np.tan(np.radians(rng.uniform(20, 40))), 0.55 * ground)
  slope = np.arctan2(rise, length)
  x_high = width / 2 - side * 0.48 * width
  top = np.array([x_high, ground - rise])
  ramp_color, color = _pick_colors(rng, 2)
  ramp_name = f'{ramp_color} ramp'
  body, shape = _static_poly([(x_high, ground), top, (x_high + side * length, ground)])
  scene.add_object(ramp_name, body, [shape], COLORS[ramp_color])
  downhill = np.array([side * np.cos(slope), np.sin(slope)])
  up_normal = np.array([side * np.sin(slope), -np.cos(slope)])
  size, radius = _ball_radius(rng, scene.unit)
  is_ball = rng.random() < 0.6
  half_height = radius if is_ball else 0.8 * radius
  dropped = rng.random() < 0.5
  position = (top + rng.uniform(0.1, 0.3) * np.hypot(length, rise) * downhill
              + (half_height + 0.5) * up_normal)
  if dropped:
    position[1] = max(position[1] - rng.uniform(0.1, 0.25) * height, radius + 1)
  elasticity, mass_density = rng.uniform(0.05, 0.4), rng.uniform(0.5, 2)
  if is_ball:
    name = _named(size, color, 'ball')
    scene.add_ball(name, color, position, radius, scene.mass(radius, mass_density),
                   elasticity, rng.uniform(0.3, 0.9))
  else:
    name, box = _named(size, color, 'box'), (2 * radius, 2 * half_height)
    scene.add_box(name, color, position, box, scene.mass(box, mass_density), elasticity,
                  rng.uniform(0.1, 0.9), angle=side * slope)
  start = 'falls onto' if dropped else 'sits on'
  motion = f"{'rolls' if is_ball else 'slides'} {_side_word(side)}"

  def caption(position, *_):
    moved = (position[-1, 1, 0] - position[0, 1, 0]) * side > 0.1 * scene.unit
    return f"{_a(name)} {start} {_a(ramp_name)} and {motion if moved else 'stays put'}"

  scene.agent = 1
  scene.caption = caption
  return scene


def stack(rng, width, height, duration):
  """A stack of two to five leaning boxes on the ground, sometimes hit by a thrown ball; it
  topples or stands depending on the lean and the throw."""
  gravity = rng.uniform(5, 10) * height / duration ** 2
  scene = Scene('stack', width, height, gravity=gravity)
  ground, _ = scene.add_ground(rng)
  count = int(rng.integers(2, 6))
  size = (rng.uniform(0.1, 0.16) * scene.unit,
          min(rng.uniform(0.07, 0.12) * scene.unit, 0.6 * ground / count))
  lean_side = rng.choice([-1, 1])
  lean = lean_side * rng.uniform(0.0, 0.45) * size[0]  # offset of each box over the one below
  x = width / 2 + rng.uniform(-0.15, 0.15) * width
  colors = _pick_colors(rng, count + 1)
  for level, color in enumerate(colors[:count]):
    position = (x + lean * level, ground - size[1] * (level + 0.5) - 0.01)
    scene.add_box(f'{color} box', color, position, size, scene.mass(size, rng.uniform(0.5, 2)),
                  rng.uniform(0.0, 0.2), rng.uniform(0.4, 0.9))
  top = count - 1
  thrown = rng.random() < 0.4
  if thrown:  # from the side the stack leans away from, aimed at the top box
    ball_size, radius = _ball_radius(rng, scene.unit)
    start = np.array([width / 2 - lean_side * (width / 2 - radius - 1),
                      rng.uniform(0.4, 0.7) * ground])
    flight = rng.uniform(0.2, 0.35) * duration
    aim = np.array(scene.objects[top].body.position)
    velocity = (aim - start) / flight - (0, 0.5 * gravity * flight)
    scene.add_ball(_named(ball_size, colors[count], 'ball'), colors[count], start, radius,
                   scene.mass(radius, rng.uniform(2, 4)), rng.uniform(0.2, 0.6), 0.5,
                   velocity=velocity)

  def caption(position, angle, _):
    fell = (position[-1, top, 1] - position[0, top, 1] > 0.5 * size[1]
            or abs(angle[-1, top] - angle[0, top]) > 0.6)
    shift = position[-1, top, 0] - position[0, top, 0]
    outcome = f'topples to the {_side_word(shift)}' if fell else 'stays standing'
    if thrown:
      ball = scene.objects[count].name
      return f'{_a(ball)} is thrown at a stack of {count} boxes, which {outcome}'
    return f'a stack of {count} boxes {outcome}'

  scene.agent = count if thrown else top
  scene.caption = caption
  return scene


def pendulum(rng, width, height, duration):
  """A ball on a rod, two balls on rods (a double pendulum) or a ball on a spring, hung from a
  fixed pin; no ground."""
  scene = Scene('pendulum', width, height, gravity=rng.uniform(15, 40) * height / duration ** 2)
  gravity = scene.space.gravity[1]
  static = scene.space.static_body
  anchor = (rng.uniform(0.35, 0.65) * width, rng.uniform(0.1, 0.25) * height)
  rod_color = SCENERY_COLORS[rng.choice(list(SCENERY_COLORS))]
  rod = max(0.6, 0.02 * scene.unit)
  pin = pymunk.Circle(static, 1.5 * rod, anchor)
  pin.sensor = True  # drawn, but the bobs pass over it
  scene.add_scenery(pin, rod_color)
  variant = rng.choice(['single', 'double', 'spring'])
  colors = _pick_colors(rng, 2)
  size, radius = _ball_radius(rng, scene.unit, ('small', 'medium'))
  room = min(anchor[0], width - anchor[0], height - anchor[1]) - radius - 1
  first_bob = len(scene.drawables)

  def add_bob(color, position):
    index = scene.add_ball(_named(size, color, 'ball'), color, position, radius,
                           scene.mass(radius, rng.uniform(0.5, 2)), rng.uniform(0.2, 0.8),
                           rng.uniform(0.2, 0.8))
    return scene.objects[index].body

  rods = []
  if variant == 'spring':
    rest = rng.uniform(0.3, 0.5) * room
    # a period of 30-60% of the clip, but stiff enough that the sag stays within the frame
    omega = max(2 * np.pi / (rng.uniform(0.3, 0.6) * duration), np.sqrt(gravity / (0.25 * room)))
    sag = gravity / omega ** 2
    body = add_bob(colors[0], np.add(anchor, (rng.uniform(-0.1, 0.1) * rest,
                                             rest + rng.uniform(0, 1.8) * sag)))
    scene.space.add(pymunk.DampedSpring(static, body, anchor, (0, 0), rest,
                                        body.mass * omega ** 2, 0.0))
    rods.append(Link(static, anchor, body, (0, 0), 0.5 * rod))
    caption = f'{_a(scene.objects[0].name)} bobs up and down on a spring'
  else:
    lengths = ([rng.uniform(0.5, 0.9) * room] if variant == 'single'
               else rng.uniform(0.35, 0.45, 2) * room)
    pivot_body, pivot_anchor, pivot = static, anchor, np.array(anchor)
    swing = rng.choice([-1, 1]) * np.radians(rng.uniform(25, 80))  # from straight down
    for length, color in zip(lengths, colors):
      pivot = pivot + max(length, 2 * radius + 1) * np.array([np.sin(swing), np.cos(swing)])
      body = add_bob(color, pivot)
      scene.space.add(pymunk.PinJoint(pivot_body, body, pivot_anchor, (0, 0)))
      rods.append(Link(pivot_body, pivot_anchor, body, (0, 0), rod))
      pivot_body, pivot_anchor = body, (0, 0)
      swing = rng.uniform(-np.pi / 2, np.pi / 2)
    names = [o.name for o in scene.objects]
    caption = (f'{_a(names[0])} swings on a rod from the {_side_word(pivot[0] - anchor[0])}'
               if variant == 'single' else
               f'a double pendulum of {_a(names[0])} and {_a(names[1])} swings')
  scene.drawables[first_bob:first_bob] = [Drawable(r, rod_color) for r in rods]  # behind balls
  scene.agent = len(scene.objects) - 1
  scene.caption = lambda *_: caption
  return scene


def spill(rng, width, height, duration):
  """A cup full of grains stands at the edge of a shelf; an unseen hand (the cup is a
  kinematic body) tips it 120-150 degrees about its outer bottom corner, and the grains
  pour out onto the ground. Object 0 is the cup, its position the corner it turns about."""
  scene = Scene('spill', width, height, gravity=rng.uniform(8, 15) * height / duration ** 2)
  ground, shelf_color = scene.add_ground(rng)
  unit = scene.unit
  side = rng.choice([-1, 1])  # +1: the cup stands left of the shelf's edge and tips right
  wall = max(1.5, 0.03 * unit)
  inner_width, inner_height = rng.uniform(0.2, 0.3) * unit, rng.uniform(0.15, 0.25) * unit
  outer = inner_width + 2 * wall
  # the cup turns about the pivot, so it must clear the ground at any angle
  reach = np.hypot(outer, inner_height + wall)
  pivot = (width / 2 - side * rng.uniform(0.0, 0.12) * width,
           min(rng.uniform(0.35, 0.5) * ground, ground - reach - 2))

  def rect(x0, x1, y0, y1):  # in the cup's frame, mirrored for a cup that tips left
    return [(side * x0, y0), (side * x1, y0), (side * x1, y1), (side * x0, y1)]

  cup = pymunk.Body(body_type=pymunk.Body.KINEMATIC)
  cup.position = pivot
  cup_color, particle_color = _pick_colors(rng, 2)
  walls = [rect(-outer, 0, -wall, 0), rect(-outer, -outer + wall, -wall - inner_height, 0),
           rect(-wall, 0, -wall - inner_height, 0)]
  scene.add_object(f'{cup_color} cup', cup, [pymunk.Poly(cup, v) for v in walls],
                   COLORS[cup_color])
  shelf_end = pivot[0] - side * 2 * width
  scene.add_scenery(pymunk.Poly(scene.space.static_body,
                                [(pivot[0], pivot[1]), (shelf_end, pivot[1]),
                                 (shelf_end, pivot[1] + wall), (pivot[0], pivot[1] + wall)]),
                    SCENERY_COLORS[shelf_color])

  radius = max(1.2, rng.uniform(0.02, 0.03) * unit)
  spacing = 2 * radius + 0.2
  columns = max(1, int(inner_width // spacing))
  rows = max(1, int(inner_height // spacing))
  count = min(columns * rows, 20)
  elasticity, friction = rng.uniform(0.1, 0.4), rng.uniform(0.3, 0.7)
  for i in range(count):  # filled bottom row first
    row, column = divmod(i, columns)
    x = -wall - inner_width + radius + 0.1 + column * spacing + rng.uniform(0, 0.1)
    y = -wall - radius - 0.1 - row * spacing
    grain = (2 * radius, 2 * radius)  # square grains come to rest; balls would roll away
    scene.add_box(f'{particle_color} grain', particle_color,
                  (pivot[0] + side * x, pivot[1] + y), grain, scene.mass(grain, 0.5),
                  elasticity, friction)

  # tipped by 45% of the clip, so the grains have landed by its end
  start, turn = rng.uniform(0.05, 0.2) * duration, rng.uniform(0.15, 0.25) * duration
  rate = side * np.radians(rng.uniform(120, 150)) / turn  # > 0 turns clockwise on screen

  def drive(time):
    cup.angular_velocity = rate if start <= time < start + turn else 0.0

  def caption(position, angle, _):
    # grains outside the cup's inner rectangle, in the cup's frame at the last frame
    c, s = np.cos(angle[-1, 0]), np.sin(angle[-1, 0])
    offset = position[-1, 1:] - position[-1, 0]
    x = side * (c * offset[:, 0] + s * offset[:, 1])
    y = -s * offset[:, 0] + c * offset[:, 1]
    inside = ((x > -wall - inner_width - radius) & (x < -wall + radius)
              & (y > -wall - inner_height - radius) & (y < -wall + radius))
    spilled = int((~inside).sum())
    tips = f'{_a(cup_color)} cup tips over to the {_side_word(side)}'
    grains = f"{count} {particle_color} grain{'s' * (count > 1)}"
    if spilled == 0:
      return f"{tips} but its {grains} {'stay' if count > 1 else 'stays'} inside"
    return f'{tips} and spills {spilled} of its {grains}'

  scene.drive = drive
  scene.caption = caption
  return scene  # no agent: impulses cannot move the kinematic cup


def occlude(rng, width, height, duration):
  """A ball rolls along the ground behind a wall drawn in front of it (an occluder that nothing
  collides with): it is not visible while behind the wall, then comes out the other side."""
  scene = Scene('occlude', width, height, gravity=rng.uniform(5, 10) * height / duration ** 2)
  ground, _ = scene.add_ground(rng)
  wall_color, color = _pick_colors(rng, 2)
  size, radius = _ball_radius(rng, scene.unit, ('small', 'medium'))
  wall_width = max(rng.uniform(0.18, 0.3) * width, 2 * radius + 4)
  wall_height = max(rng.uniform(0.35, 0.6) * ground, 2 * radius + 3)
  centre = rng.uniform(0.4, 0.6) * width
  direction = rng.choice([-1, 1])
  start = np.clip(centre - direction * rng.uniform(0.3, 0.4) * width, radius + 1,
                  width - radius - 1)
  speed = direction * abs(centre - start) / (rng.uniform(0.35, 0.55) * duration)
  name = _named(size, color, 'ball')
  ball = scene.add_ball(name, color, (start, ground - radius - 0.01), radius,
                        scene.mass(radius, rng.uniform(0.5, 2)), rng.uniform(0.1, 0.4),
                        rng.uniform(0.4, 0.9), velocity=(speed, 0.0),
                        angular_velocity=speed / radius)  # rolling without slipping
  left, right = centre - wall_width / 2, centre + wall_width / 2
  body, occluder = _static_poly([(left, ground - wall_height), (right, ground - wall_height),
                                 (right, ground), (left, ground)])
  occluder.sensor = True  # seen, never touched
  scene.add_object(f'{wall_color} wall', body, [occluder], COLORS[wall_color])
  rolls = f'{_a(name)} rolls {_side_word(direction)}'
  wall = f'{_a(wall_color)} wall'

  def caption(position, angle, visible):
    x = position[:, ball, 0]
    behind = ~visible[:, ball] & (np.abs(x - centre) < wall_width / 2)  # not just out of frame
    if not behind.any():
      return f'{rolls} toward {wall}'
    if behind[-1]:
      return f'{rolls} and disappears behind {wall}'
    other_side = (x[-1] - centre) * direction > 0
    comes = 'comes out the other side' if other_side else 'comes back'
    return f'{rolls}, passes behind {wall} and {comes}'

  scene.agent = ball
  scene.caption = caption
  return scene


SCENES = {family.__name__: family
          for family in (drop, collide, ramp, stack, pendulum, spill, occlude)}
