"""Train the built-in ResNet-50 extractor on built-in frames, and probe what frame features carry.

Random-init ResNet-50 features carry colour weakly and shape hardly at all (measured before this
extractor existed: 56% / 59% on a colour / circle-vs-square probe), and no pretrained weights can
be downloaded here. So the built-in extractor keeps seeded random convolutions in its deep stages
and trains the stem, the first two stages and every BatchNorm (the affine parameters steer the
frozen random stages: Frankle et al., "Training BatchNorm and only BatchNorm", ICLR 2021).
Residual branches start at zero (`engine.vision.seeded_resnet50`), which made this short training
converge several times faster. Only the trained tensors ship; the rest is regenerated from the seed.

The training task asks what captions talk about, from the pooled 2048-d vector alone: the object's
colour, shape and size, its coarse x and y position, and the background. The position questions
matter: pooling averages the grid away, and motion can only be read from frame features that still
say where things are.

The probe (`probe_features`) is the check: a logistic regression on frame features of fresh clips
must tell colour, shape and motion well above chance.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from engine.vision import RegionExtractor, VisionConfig, is_trained_key, save_builtin, seeded_resnet50
from training import synthetic as syn

COLOURS = list(syn.COLOURS)
SHAPES = list(syn.SHAPES)
SIZES = list(syn.SIZES)
BACKGROUNDS = list(syn.BACKGROUNDS)
MOTIONS = list(syn.MOTIONS)
POSITION_BINS = 4


@dataclass
class ExtractorTrainConfig:
    seed: int = 0  # the convolutions' seed (shipped in the weights' metadata)
    data_seed: int = 1234  # clips for training are drawn from their own seed
    clips: int = 600
    frames: int = 8
    size: int = 64
    epochs: int = 4
    batch_size: int = 32
    lr: float = 2e-3
    threads: int = 1
    trained_stages: int = 3  # convolutions trained: stem + stages 1-2 (see engine.vision.is_trained_key)
    recalibrate: bool = False


# ---------------------------------------------------------------------------------------------
# Targets

# One classification question each: the object's colour, shape, size, its x and y position bins,
# and the background. Training scenes hold one object so that every question has one answer
# (clean labels, plain cross-entropy).
QUESTIONS = {
    "colour": len(COLOURS), "shape": len(SHAPES), "size": len(SIZES),
    "x": POSITION_BINS, "y": POSITION_BINS, "background": len(BACKGROUNDS),
}


def frame_answers(scene, t: float) -> list:
    obj = scene.objects[0]
    x, y = syn.object_centre(obj, t)
    return [
        COLOURS.index(obj.colour), SHAPES.index(obj.shape), SIZES.index(obj.size),
        int(np.clip(x * POSITION_BINS, 0, POSITION_BINS - 1)), int(np.clip(y * POSITION_BINS, 0, POSITION_BINS - 1)),
        BACKGROUNDS.index(scene.background),
    ]


def training_frames(config: ExtractorTrainConfig) -> tuple:
    """Frames (N, S, S, 3) uint8 of single-object clips and their answers (N, len(QUESTIONS))."""
    clips, scenes = probe_clips(config.clips, config.frames, config.size, config.data_seed)
    answers = [frame_answers(s, f / max(config.frames - 1, 1)) for s in scenes for f in range(config.frames)]
    return clips.reshape(-1, config.size, config.size, 3), np.array(answers)


# ---------------------------------------------------------------------------------------------
# Training


def train_extractor(config: ExtractorTrainConfig, out_path: str, progress: bool = True) -> dict:
    """Train the seeded ResNet-50's BatchNorm layers and first convolutions (`trained_stages`);
    write the trained tensors to `out_path`; return the log."""
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    frames, answers = training_frames(config)
    model = seeded_resnet50(config.seed)
    extractor = RegionExtractor(model, VisionConfig(image_size=config.size))
    heads = nn.ModuleList(nn.Linear(2048, n) for n in QUESTIONS.values())
    for name, param in model.named_parameters():
        param.requires_grad_(is_trained_key(name, config.trained_stages))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable + list(heads.parameters()), lr=config.lr)
    order_rng = np.random.default_rng(config.seed)
    log, start = [], time.time()
    model.train()
    for epoch in range(config.epochs):
        order = order_rng.permutation(len(frames))
        bar = tqdm(range(0, len(order), config.batch_size), desc=f"extractor epoch {epoch + 1}", disable=not progress)
        losses = []
        for begin in bar:
            index = order[begin : begin + config.batch_size]
            pixels = extractor.preprocess(frames[index])
            pooled = model(pixel_values=pixels).last_hidden_state.mean(dim=(2, 3))
            targets = torch.from_numpy(answers[index])
            loss = sum(nn.functional.cross_entropy(head(pooled), targets[:, i]) for i, head in enumerate(heads))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        log.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(time.time() - start, 1)})
    # Optionally replace the momentum-averaged running statistics by exact population statistics
    # over the training frames (off by default: measured no better here).
    if config.recalibrate:
        recalibrate_batchnorm(model, extractor, frames, config.batch_size)
    model.eval()
    save_builtin(model, out_path, config.seed, config.trained_stages,
                 extra={"train_config": asdict(config), "log": log})
    return {"config": asdict(config), "log": log}


@torch.no_grad()
def recalibrate_batchnorm(model, extractor, frames: np.ndarray, batch_size: int) -> None:
    """Set every BatchNorm's running mean/var to the population statistics over `frames`."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # None: cumulative moving average, i.e. the exact mean over batches
    model.train()
    for begin in range(0, len(frames), batch_size):
        model(pixel_values=extractor.preprocess(frames[begin : begin + batch_size]))
    model.eval()


# ---------------------------------------------------------------------------------------------
# Probe


@dataclass
class ProbeResult:
    colour: float
    shape: float
    motion: float
    chance_colour: float
    chance_shape: float
    chance_motion: float
    clips: int

    def table(self) -> str:
        rows = [
            ("colour", self.colour, self.chance_colour),
            ("shape", self.shape, self.chance_shape),
            ("motion", self.motion, self.chance_motion),
        ]
        lines = ["| attribute | probe accuracy | chance |", "|---|---|---|"]
        lines += [f"| {name} | {acc * 100:.1f}% | {chance * 100:.1f}% |" for name, acc, chance in rows]
        return "\n".join(lines)


def probe_clips(n_clips: int, frames: int, size: int, seed: int) -> tuple:
    """Single-object clips (clean labels) for the probe: clips (N, F, S, S, 3) and their scenes."""
    rng = np.random.default_rng(seed)
    clips, scenes = [], []
    while len(scenes) < n_clips:
        scene = syn.sample_scene(rng, f"probe{len(scenes)}")
        scene.objects = scene.objects[:1]
        scenes.append(scene)
        clips.append(syn.render_clip(scene, frames, size))
    return np.stack(clips), scenes


def probe_features(extractor: RegionExtractor, n_clips: int = 240, n_frames: int = 600, frames: int = 8,
                   size: int = 64, seed: int = 98765) -> ProbeResult:
    """Linear-probe accuracies on fresh single-object scenes (clean labels), trained on 2/3 and
    tested on the rest: colour and shape from one frame's pooled vector (`n_frames` scenes), motion
    from a clip's frames, each minus the first (`n_clips` clips)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def accuracy(features, labels):
        n_train = 2 * len(labels) // 3
        classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5))
        classifier.fit(features[:n_train], labels[:n_train])
        return float(classifier.score(features[n_train:], labels[n_train:])), _majority_rate(labels[n_train:])

    stills, still_scenes = probe_clips(n_frames, 1, size, seed)
    pooled = extractor.pooled(stills[:, 0])
    colour, chance_colour = accuracy(pooled, np.array([COLOURS.index(s.objects[0].colour) for s in still_scenes]))
    shape, chance_shape = accuracy(pooled, np.array([SHAPES.index(s.objects[0].shape) for s in still_scenes]))

    clips, scenes = probe_clips(n_clips, frames, size, seed + 1)
    pooled = extractor.pooled(clips.reshape(-1, size, size, 3)).reshape(n_clips, frames, -1)
    motion_features = (pooled[:, 1:] - pooled[:, :1]).reshape(n_clips, -1)
    motion, chance_motion = accuracy(motion_features, np.array([MOTIONS.index(s.objects[0].motion) for s in scenes]))
    return ProbeResult(colour=colour, shape=shape, motion=motion, chance_colour=chance_colour,
                       chance_shape=chance_shape, chance_motion=chance_motion, clips=n_clips)


def _majority_rate(labels: np.ndarray) -> float:
    """Chance as the accuracy of always answering the most frequent class (at least 1/#classes)."""
    return float(np.bincount(labels).max() / len(labels))
