"""The built-in synthetic set's scenes: the attribute tables, sampling a clip's scene, and drawing its frames."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# ---------------------------------------------------------------------------------------------
# The scene vocabulary. Each attribute value has synonyms; captions pick among them at random.

SHAPES = {
    "circle": ["circle", "ball", "disc", "round dot"],
    "square": ["square", "box", "block", "cube"],
    "triangle": ["triangle", "wedge", "triangular shape"],
    "star": ["star", "star shape", "starlet"],
    "cross": ["cross", "plus sign", "x shape"],
    "diamond": ["diamond", "rhombus", "lozenge"],
}
COLOURS = {  # name -> (RGB, synonyms)
    "red": ((220, 40, 40), ["red", "crimson", "scarlet"]),
    "green": ((40, 200, 60), ["green", "emerald", "lime"]),
    "blue": ((50, 90, 235), ["blue", "azure", "cobalt"]),
    "yellow": ((235, 220, 50), ["yellow", "golden", "lemon"]),
    "purple": ((160, 60, 210), ["purple", "violet", "lilac"]),
    "orange": ((245, 140, 30), ["orange", "amber", "tangerine"]),
    "white": ((240, 240, 240), ["white", "snowy", "pale"]),
    "cyan": ((40, 215, 220), ["cyan", "turquoise", "teal"]),
}
SIZES = {
    "small": (0.12, ["small", "tiny", "little"]),
    "large": (0.2, ["large", "big", "huge"]),
}
MOTIONS = {
    "still": ["stands still", "stays in place", "is not moving", "rests"],
    "left": ["moves to the left", "slides left", "drifts leftward", "travels to the left"],
    "right": ["moves to the right", "slides right", "drifts rightward", "travels to the right"],
    "up": ["moves up", "rises", "floats upward", "climbs up"],
    "down": ["moves down", "falls", "drops", "sinks downward"],
    "circles": ["moves in a circle", "circles around", "goes round in a loop", "orbits"],
    "bounces": ["bounces", "bounces up and down", "hops", "jumps up and down"],
}
BACKGROUNDS = {
    "black": ["a black background", "a dark background", "a plain black backdrop"],
    "grey": ["a grey background", "a gray backdrop", "a dull grey background"],
    "striped": ["a striped background", "stripes", "a background of stripes"],
    "checkered": ["a checkered background", "a checkerboard", "a chequered backdrop"],
    "gradient": ["a gradient background", "a fading backdrop", "a shaded background"],
}


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    motion: str
    start: tuple  # (x, y) centre at the first frame, in [0, 1] of the frame
    rgb: tuple  # the drawn colour: the named colour with a small per-clip jitter


@dataclass
class Scene:
    video_id: str
    background: str
    objects: list = field(default_factory=list)
    distractors: int = 0
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# Sampling scenes


def sample_scene(rng: np.random.Generator, video_id: str, forbidden: frozenset = frozenset()) -> Scene:
    """One clip's description: 1-3 objects with distinct (colour, shape), a background, specks;
    no object is a (colour, shape) pair of `forbidden` (the transfer split's held-out pairs)."""
    n_objects = int(rng.choice([1, 1, 2, 2, 3]))
    objects, seen = [], set()
    while len(objects) < n_objects:
        shape = str(rng.choice(list(SHAPES)))
        colour = str(rng.choice(list(COLOURS)))
        if (shape, colour) in seen or (colour, shape) in forbidden:
            continue
        seen.add((shape, colour))
        motion = str(rng.choice(list(MOTIONS)))
        rgb = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[colour][0])
        objects.append(
            SceneObject(
                shape=shape,
                colour=colour,
                size=str(rng.choice(list(SIZES))),
                motion=motion,
                start=_start_position(rng, motion),
                rgb=rgb,
            )
        )
    return Scene(
        video_id=video_id,
        background=str(rng.choice(list(BACKGROUNDS))),
        objects=objects,
        distractors=int(rng.integers(0, 4)),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


def _start_position(rng: np.random.Generator, motion: str) -> tuple:
    # Start where the whole path stays inside the frame: a leftward object starts on the right.
    x, y = rng.uniform(0.3, 0.7, size=2)
    if motion == "left":
        x = rng.uniform(0.65, 0.8)
    elif motion == "right":
        x = rng.uniform(0.2, 0.35)
    elif motion == "up":
        y = rng.uniform(0.65, 0.8)
    elif motion == "down":
        y = rng.uniform(0.2, 0.35)
    return (round(float(x), 4), round(float(y), 4))


def object_centre(obj: SceneObject, t: float) -> tuple:
    """Centre of an object at time t in [0, 1] (first to last frame), in frame units."""
    x, y = obj.start
    travel = 0.45
    if obj.motion == "left":
        x -= travel * t
    elif obj.motion == "right":
        x += travel * t
    elif obj.motion == "up":
        y -= travel * t
    elif obj.motion == "down":
        y += travel * t
    elif obj.motion == "circles":
        angle = 2 * np.pi * t
        x, y = x + 0.18 * np.cos(angle) - 0.18, y + 0.18 * np.sin(angle)
    elif obj.motion == "bounces":
        y -= 0.25 * abs(np.sin(2 * np.pi * t))
    return x, y


# ---------------------------------------------------------------------------------------------
# Rendering


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of a shape centred at the origin; dx, dy are pixel offsets from the centre."""
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        return np.maximum(abs(dx), abs(dy)) <= radius * 0.85
    if shape == "diamond":
        return abs(dx) + abs(dy) <= radius * 1.15
    if shape == "cross":
        arm = radius / 3
        return ((abs(dx) <= arm) & (abs(dy) <= radius)) | ((abs(dy) <= arm) & (abs(dx) <= radius))
    if shape == "triangle":  # pointing up: the half-width grows linearly from apex to base
        top, bottom = -radius, radius * 0.8
        inside_rows = (dy >= top) & (dy <= bottom)
        half_width = (dy - top) / (bottom - top) * radius
        return inside_rows & (abs(dx) <= half_width)
    if shape == "star":  # five points: the boundary radius oscillates with the angle
        rho = np.sqrt(dx**2 + dy**2)
        theta = np.arctan2(dy, dx) + np.pi / 2
        boundary = radius * (0.45 + 0.55 * ((np.cos(5 * theta) + 1) / 2) ** 2)
        return rho <= boundary
    raise ValueError(f"unknown shape {shape!r}")


def draw_background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A dark or muted background (colours must stay visible on it), float32 HxWx3 in 0..255."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    tint = rng.uniform(-8, 8, size=3).astype(np.float32)
    if kind == "black":
        image = np.full((size, size, 3), 12.0, np.float32)
    elif kind == "grey":
        image = np.full((size, size, 3), 95.0, np.float32)
    elif kind == "striped":
        period = max(4, size // 8)
        band = ((yy // (period / 2)) % 2)[..., None]
        image = band * np.array([70, 70, 95], np.float32) + (1 - band) * np.array([25, 25, 40], np.float32)
    elif kind == "checkered":
        period = max(4, size // 6)
        cell = (((yy // period) + (xx // period)) % 2)[..., None]
        image = cell * np.array([85, 60, 45], np.float32) + (1 - cell) * np.array([35, 30, 25], np.float32)
    elif kind == "gradient":
        ramp = (yy / max(size - 1, 1))[..., None]
        image = (1 - ramp) * np.array([20, 30, 80], np.float32) + ramp * np.array([90, 80, 60], np.float32)
    else:
        raise ValueError(f"unknown background {kind!r}")
    return image + tint


def render_clip(scene: Scene, frames: int, size: int) -> np.ndarray:
    """The clip's frames as uint8, (frames, size, size, 3)."""
    rng = np.random.default_rng(scene.seed)
    background = draw_background(scene.background, size, rng)
    speck_start = rng.uniform(0.05, 0.95, size=(scene.distractors, 2))
    speck_step = rng.normal(0, 0.03, size=(frames, scene.distractors, 2)).cumsum(axis=0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    clip = np.empty((frames, size, size, 3), np.uint8)
    for f in range(frames):
        t = f / max(frames - 1, 1)
        image = background.copy()
        for obj in scene.objects:
            cx, cy = object_centre(obj, t)
            mask = shape_mask(obj.shape, xx - cx * size, yy - cy * size, SIZES[obj.size][0] * size)
            image[mask] = obj.rgb
        for (sx, sy) in np.clip(speck_start + speck_step[f], 0.02, 0.98):
            px, py = int(sx * size), int(sy * size)
            image[py : py + 2, px : px + 2] = 150.0  # unnamed grey specks: distractors
        image += rng.normal(0, 4.0, size=image.shape).astype(np.float32)  # sensor noise
        clip[f] = np.clip(image, 0, 255).round().astype(np.uint8)
    return clip

