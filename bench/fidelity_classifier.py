"""The reader of bench/fidelity.py: a small CNN trained on real built-in frames that reads, from one
image, the background, which colours and shapes are present, and per colour the shape and size of
that colour's object (binding heads); with the labelled real frames it learns from and the
``Reading`` it returns. See bench/fidelity.py for how its readings are scored.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from training.synthetic import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    SIZES,
    Scene,
    object_centre,
    render_clip,
    sample_scene,
    shape_mask,
)

BG_NAMES = list(BACKGROUNDS)
COLOUR_NAMES = list(COLOURS)
SHAPE_NAMES = list(SHAPES)
SIZE_NAMES = list(SIZES)


# ---------------------------------------------------------------------------------------------
# Real frames with their labels


@dataclass
class FrameConfig:
    render_size: int = 64  # the collection's default frame size
    frames: int = 8  # the collection's default clip length; the key frame is frames // 2
    image_size: int = 32  # the built-in generator's anchor size (frames are box-resized to it)
    min_visible: float = 0.5  # an object counts as shown when at least this part of it is visible


def _key_time(cfg: FrameConfig) -> float:
    return (cfg.frames // 2) / max(cfg.frames - 1, 1)


def visible_fractions(scene: Scene, cfg: FrameConfig) -> list:
    """Per object, the part of its unclipped area that is visible in the key frame (inside the
    frame and not painted over by a later object)."""
    size = cfg.render_size
    big = 3 * size  # a canvas wide enough that no shape is clipped: the unclipped area
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32) - size
    t = _key_time(cfg)
    masks = []
    for obj in scene.objects:
        cx, cy = object_centre(obj, t)
        masks.append(shape_mask(obj.shape, xx - cx * size, yy - cy * size, SIZES[obj.size][0] * size))
    inside = np.zeros((big, big), bool)
    inside[size:2 * size, size:2 * size] = True
    out = []
    for i, mask in enumerate(masks):
        covered = np.zeros_like(mask)
        for later in masks[i + 1:]:
            covered |= later
        out.append(float((mask & inside & ~covered).sum() / max(mask.sum(), 1)))
    return out


def key_frame(scene: Scene, cfg: FrameConfig) -> np.ndarray:
    """The scene's key frame as the generator is trained on it: uint8 (image_size, image_size, 3)."""
    from PIL import Image

    frame = render_clip(scene, cfg.frames, cfg.render_size)[cfg.frames // 2]
    if cfg.image_size != cfg.render_size:
        frame = np.asarray(Image.fromarray(frame).resize((cfg.image_size, cfg.image_size), Image.BOX))
    return frame


def labels_of(scene: Scene, cfg: FrameConfig) -> dict:
    """Targets of one frame; -1 / NaN mark what the loss ignores (half-hidden objects, a colour
    shared by two objects)."""
    vis = visible_fractions(scene, cfg)
    colour = np.zeros(len(COLOUR_NAMES), np.float32)
    shape = np.zeros(len(SHAPE_NAMES), np.float32)
    bound_shape = np.full(len(COLOUR_NAMES), -1, np.int64)
    bound_size = np.full(len(COLOUR_NAMES), -1, np.int64)
    for obj, v in zip(scene.objects, vis, strict=True):
        c, s = COLOUR_NAMES.index(obj.colour), SHAPE_NAMES.index(obj.shape)
        if v >= cfg.min_visible:
            colour[c] = 1.0
            shape[s] = 1.0
        else:  # partly shown: neither present nor absent for the loss (unless shown by another object)
            colour[c] = colour[c] if colour[c] == 1.0 else np.nan
            shape[s] = shape[s] if shape[s] == 1.0 else np.nan
    for c_name in COLOUR_NAMES:
        same = [(o, v) for o, v in zip(scene.objects, vis, strict=True) if o.colour == c_name]
        if len(same) == 1 and same[0][1] >= cfg.min_visible:
            c = COLOUR_NAMES.index(c_name)
            bound_shape[c] = SHAPE_NAMES.index(same[0][0].shape)
            bound_size[c] = SIZE_NAMES.index(same[0][0].size)
    return {"background": BG_NAMES.index(scene.background), "colour": colour, "shape": shape,
            "bound_shape": bound_shape, "bound_size": bound_size}


def real_frames(n: int, seed: int, cfg: FrameConfig, progress: bool = False) -> tuple:
    """n key frames of scenes drawn by ``sample_scene`` (the collection's distribution) and their
    stacked labels: (uint8 N x S x S x 3, dict of arrays)."""
    from tqdm import tqdm

    rng = np.random.default_rng([seed, 20170])
    images, labels = [], []
    for i in tqdm(range(n), desc="real frames", unit="frame", disable=not progress):
        scene = sample_scene(rng, f"fidelity{i}")
        images.append(key_frame(scene, cfg))
        labels.append(labels_of(scene, cfg))
    stacked = {k: np.stack([lab[k] for lab in labels]) for k in labels[0]}
    return np.stack(images), stacked


# ---------------------------------------------------------------------------------------------
# The classifier


@dataclass
class ClassifierConfig:
    train_frames: int = 4000
    val_frames: int = 600
    epochs: int = 12
    batch_size: int = 32
    lr: float = 3e-3
    width: int = 24
    seed: int = 0
    frame: FrameConfig = field(default_factory=FrameConfig)


class AttributeNet(nn.Module):
    """A small CNN: 32 px image -> background, colour / shape presence, per-colour shape and size.

    A conv trunk gives an 8 x 8 map; 1x1 convs give per-location logits. Presence of a colour or a
    shape is the max over locations; the shape and size of colour c are read where the map says c
    is (the per-location logits pooled with a softmax over colour c's presence logits): binding by
    location, as a detector would. The background is read from the mean of the map."""

    def __init__(self, width: int = 24, image_size: int = 32):
        super().__init__()
        w = width

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.image_size = image_size
        self.features = nn.Sequential(*block(3, w, 1), *block(w, 2 * w, 2), *block(2 * w, 2 * w, 1),
                                      *block(2 * w, 4 * w, 2), *block(4 * w, 4 * w, 1))
        nc, ns, nz = len(COLOUR_NAMES), len(SHAPE_NAMES), len(SIZE_NAMES)
        self.sizes = (nc, ns, nc * ns, nc * nz)
        self.local = nn.Conv2d(4 * w, sum(self.sizes), 1)
        self.background = nn.Linear(4 * w, len(BG_NAMES))

    def forward(self, images: torch.Tensor) -> dict:
        """images: uint8 or float in 0..255, (B, S, S, 3)."""
        x = images.float().permute(0, 3, 1, 2) / 255.0 - 0.5
        f = self.features(x)
        b = f.shape[0]
        nc, ns, nz = len(COLOUR_NAMES), len(SHAPE_NAMES), len(SIZE_NAMES)
        colour, shape, bshape, bsize = torch.split(self.local(f).flatten(2), self.sizes, dim=1)  # (B, k, L)
        where = colour.softmax(-1)  # (B, nc, L): where each colour is
        bshape = (bshape.view(b, nc, ns, -1) * where[:, :, None]).sum(-1)
        bsize = (bsize.view(b, nc, nz, -1) * where[:, :, None]).sum(-1)
        return {"background": self.background(f.mean((2, 3))), "colour": colour.amax(-1), "shape": shape.amax(-1),
                "bound_shape": bshape, "bound_size": bsize}


def _loss(logits: dict, target: dict) -> torch.Tensor:
    loss = F.cross_entropy(logits["background"], target["background"])
    for key in ("colour", "shape"):
        keep = ~torch.isnan(target[key])
        loss = loss + F.binary_cross_entropy_with_logits(logits[key][keep], target[key][keep])
    for key in ("bound_shape", "bound_size"):
        t = target[key]
        if (t >= 0).any():
            loss = loss + F.cross_entropy(logits[key].reshape(-1, logits[key].shape[-1]), t.reshape(-1),
                                          ignore_index=-1)
    return loss


def _tensors(labels: dict, idx=None) -> dict:
    return {k: torch.from_numpy(v if idx is None else v[idx]) for k, v in labels.items()}


class Classifier:
    """A trained AttributeNet with its config; ``read(images)`` -> Reading."""

    def __init__(self, net: AttributeNet, config: ClassifierConfig, info: dict | None = None):
        self.net = net.eval()
        self.config = config
        self.info = info or {}

    @torch.no_grad()
    def read(self, images: np.ndarray, batch: int = 256) -> Reading:
        images = resize_to(np.asarray(images), self.config.frame.image_size)
        parts = []
        for i in range(0, len(images), batch):
            out = self.net(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])))
            colour, bound_shape = out["colour"].sigmoid(), out["bound_shape"].softmax(-1)
            # A shape is present when some present colour's object has it: read through the binding
            # heads (more accurate on held-out frames than the max-pooled shape logits, which only
            # help training).
            shape = (colour[:, :, None] * bound_shape).amax(1)
            parts.append({"background": out["background"].softmax(-1), "colour": colour, "shape": shape,
                          "bound_shape": bound_shape, "bound_size": out["bound_size"].softmax(-1)})
        return Reading(**{k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]})

    def save(self, path) -> None:
        import json

        from safetensors.torch import save

        from engine import files

        meta = {"config": json.dumps(asdict(self.config)), "info": json.dumps(self.info)}
        state = {k: v.contiguous() for k, v in self.net.state_dict().items()}
        files.atomic_write(path, save(state, metadata=meta))

    @classmethod
    def load(cls, path) -> Classifier:
        import json

        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
        raw = json.loads(meta["config"])
        config = ClassifierConfig(**{**raw, "frame": FrameConfig(**raw["frame"])})
        net = AttributeNet(config.width, config.frame.image_size)
        net.load_state_dict(load_file(str(path)))
        return cls(net, config, json.loads(meta.get("info", "{}")))


def resize_to(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 N x H x W x 3 at size x size (PIL box filter down, bilinear up); unchanged when it fits."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    from PIL import Image

    kind = Image.BOX if images.shape[1] > size else Image.BILINEAR
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), kind)) for im in images])


def train_classifier(cfg: ClassifierConfig, progress: bool = True) -> Classifier:
    """Train on cfg.train_frames fresh real key frames (seeded), measure on cfg.val_frames held-out
    ones (another seed); one thread is plenty (a couple of minutes at the default size)."""
    from tqdm import tqdm

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    images, labels = real_frames(cfg.train_frames, cfg.seed, cfg.frame, progress)
    val_images, val_labels = real_frames(cfg.val_frames, cfg.seed + 1000, cfg.frame, progress)
    render_s = time.time() - t0
    net = AttributeNet(cfg.width, cfg.frame.image_size)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps_per_epoch = -(-cfg.train_frames // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_all, y_all = torch.from_numpy(images), _tensors(labels)
    bar = tqdm(range(cfg.epochs), desc="fidelity classifier", unit="epoch", disable=not progress)
    net.train()
    loss_value = float("nan")
    for _ in bar:
        order = torch.randperm(cfg.train_frames, generator=gen)
        for i in range(0, cfg.train_frames, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs two
                continue
            x = x_all[idx]
            if torch.rand((), generator=gen) < 0.5:  # mirror left-right: every attribute is mirror-invariant
                x = x.flip(2)
            loss = _loss(net(x), {k: v[idx] for k, v in y_all.items()})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.3f}")
    clf = Classifier(net, cfg)
    clf.info = {"train_seconds": round(time.time() - t0 - render_s, 1), "render_seconds": round(render_s, 1),
                "final_loss": round(loss_value, 4), "parameters": sum(p.numel() for p in net.parameters()),
                "held_out": accuracy(clf.read(val_images), val_labels)}
    return clf


def accuracy(reading: Reading, labels: dict) -> dict:
    """Accuracy of a reading on labelled real frames: background; colour and shape presence (per
    (frame, name) decision, ignored labels skipped); bound shape and size where labelled."""
    out = {"background": float((reading.background.argmax(1) == labels["background"]).mean())}
    for key in ("colour", "shape"):
        keep = ~np.isnan(labels[key])
        out[f"{key}_presence"] = float(((getattr(reading, key) > 0.5) == (labels[key] > 0.5))[keep].mean())
        exact = [(((getattr(reading, key)[i] > 0.5) == (labels[key][i] > 0.5)) | np.isnan(labels[key][i])).all()
                 for i in range(len(labels[key]))]
        out[f"{key}_set_exact"] = float(np.mean(exact))
    for key in ("bound_shape", "bound_size"):
        keep = labels[key] >= 0
        out[key] = float((getattr(reading, key).argmax(-1) == labels[key])[keep].mean())
    return {k: round(v, 4) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# What the classifier read



@dataclass
class Reading:
    """What the classifier read in each of N images (probabilities)."""

    background: np.ndarray  # N x 5
    colour: np.ndarray  # N x 8 presence
    shape: np.ndarray  # N x 6 presence
    bound_shape: np.ndarray  # N x 8 x 6: the shape of the object of each colour
    bound_size: np.ndarray  # N x 8 x 2

    def __len__(self) -> int:
        return len(self.background)

    def describe(self, i: int) -> str:
        """'large red circle, small blue star / black' for image i."""
        present = [c for c in np.argsort(-self.colour[i]) if self.colour[i, c] > 0.5]
        objects = [f"{SIZE_NAMES[self.bound_size[i, c].argmax()]} {COLOUR_NAMES[c]} "
                   f"{SHAPE_NAMES[self.bound_shape[i, c].argmax()]}" for c in present]
        return (", ".join(objects) or "nothing") + " / " + BG_NAMES[self.background[i].argmax()]
