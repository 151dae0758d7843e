"""Prompt fidelity of an anchor generator, GenEval-style: does the anchor show what the prompt says?

A small CNN (``AttributeNet``) is trained on REAL built-in frames -- scenes drawn by
``training.synthetic.sample_scene`` and rendered by ``render_clip`` exactly as the collection does,
key frame = the middle frame, box-resized to the generator's 32 px as ``training.generator.load_frames``
does -- to read, from one image:

- the background (5-way);
- which colours are present and which shapes are present (multi-label, 8 and 6 sigmoids);
- per colour, the shape and the size of the object of that colour (binding heads).

The captions of the built-in set (``make_caption`` / ``_describe_object``) name, per object, an
optional size, a colour, a shape and an optional motion, plus an optional background. A still key
frame cannot show a motion (the middle frame puts every motion near the centre, except "circles"),
and captions name no position, so the scored attributes are colour, shape, size and background.

The prompt set is fixed (``prompt_set``: seeded, written with the results): every (shape, colour)
pair at both sizes as a single-object prompt, plus two-object prompts with distinct colours and
distinct shapes, all worded with each attribute's first (canonical) word in the captions' grammar
("a large red circle moves to the left on a black background"); ``wording="synonyms"`` words the same
scenes with the captions' other synonyms.

Scoring per named object (``score``): colour = the named colour is read present; shape = the named
shape is read present; size = the size read on the named colour's object (when that colour is not
read, on the object of the colour read most confidently: "the object drawn"); colour+shape = the
named colour is present AND the shape read on that colour's object is the named one (binding);
background once per prompt; "all" = every named attribute of the prompt found. Per attribute the
score is the fraction found over all named instances.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from bench.fidelity_classifier import (
    BG_NAMES,
    COLOUR_NAMES,
    SHAPE_NAMES,
    SIZE_NAMES,
    Classifier,
    ClassifierConfig,
    FrameConfig,
    Reading,
    key_frame,
    train_classifier,
    visible_fractions,
)
from engine.tables import markdown_table
from training.synthetic import (
    BACKGROUNDS,
    COLOURS,
    MOTIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    _start_position,
)

ATTRIBUTES = ("colour", "shape", "size", "background", "colour+shape", "all")
PROMPT_SEED = 17  # the fixed prompt set's seed (issue 17)


# ---------------------------------------------------------------------------------------------
# Prompts and scores


@dataclass(frozen=True)
class PromptObject:
    colour: str
    shape: str
    size: str
    motion: str


@dataclass(frozen=True)
class PromptSpec:
    text: str
    background: str
    objects: tuple  # of PromptObject

    def as_json(self) -> dict:
        return {"text": self.text, "background": self.background, "objects": [asdict(o) for o in self.objects]}


def score_one(reading: Reading, i: int, spec: PromptSpec) -> dict:
    """{attribute: [found, ...]} for one image and its prompt (one entry per named instance)."""
    found = {a: [] for a in ATTRIBUTES}
    colour_p = reading.colour[i]
    for obj in spec.objects:
        c, s = COLOUR_NAMES.index(obj.colour), SHAPE_NAMES.index(obj.shape)
        has_colour = bool(colour_p[c] > 0.5)
        found["colour"].append(has_colour)
        found["shape"].append(bool(reading.shape[i, s] > 0.5))
        on = c if has_colour else int(colour_p.argmax())  # else: the object drawn most surely
        found["size"].append(bool(reading.bound_size[i, on].argmax() == SIZE_NAMES.index(obj.size)))
        found["colour+shape"].append(has_colour and bool(reading.bound_shape[i, c].argmax() == s))
    found["background"].append(bool(reading.background[i].argmax() == BG_NAMES.index(spec.background)))
    found["all"].append(all(v for a in ATTRIBUTES[:4] for v in found[a]))
    return found


def score(reading: Reading, specs: list) -> dict:
    """Per attribute, the fraction of named instances found, over images i <-> specs[i % len(specs)]
    (several seeds per prompt come one prompt set after another); plus "extra_colours": colours
    read beyond the named ones, per image."""
    totals = {a: [] for a in ATTRIBUTES}
    extra = []
    for i in range(len(reading)):
        spec = specs[i % len(specs)]
        for a, values in score_one(reading, i, spec).items():
            totals[a] += values
        named = {COLOUR_NAMES.index(o.colour) for o in spec.objects}
        extra.append(sum(1 for c in np.nonzero(reading.colour[i] > 0.5)[0] if c not in named))
    out = {a: float(np.mean(v)) if v else None for a, v in totals.items()}
    out["extra_colours"] = float(np.mean(extra)) if extra else None
    out["images"] = len(reading)
    return out


# ---------------------------------------------------------------------------------------------
# The fixed prompt set and its real frames


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def _word(options: list, wording: str, k: int) -> str:
    if wording == "canonical" or len(options) == 1:
        return options[0]
    return options[1 + k % (len(options) - 1)]


def prompt_text(background: str, objects, wording: str = "canonical", k: int = 0) -> str:
    """The captions' grammar ("a large red circle moves to the left on a black background"), with
    size and background always named."""
    parts = []
    for j, o in enumerate(objects):
        noun = " ".join([_word(SIZES[o.size][1], wording, k + j), _word(COLOURS[o.colour][1], wording, k + j),
                         _word(SHAPES[o.shape], wording, k + j)])
        parts.append(f"{_article(noun)} {noun} {_word(MOTIONS[o.motion], wording, k + j)}")
    return f"{' and '.join(parts)} on {_word(BACKGROUNDS[background], wording, k)}"


def prompt_set(two_object: int = 48, wording: str = "canonical", seed: int = PROMPT_SEED) -> tuple:
    """(single-object specs, two-object specs): every (shape, colour) at both sizes, then
    `two_object` pairs with distinct colours and shapes; backgrounds and motions drawn from `seed`."""
    if wording not in ("canonical", "synonyms"):
        raise ValueError(f"wording must be canonical or synonyms, got {wording!r}")
    rng = np.random.default_rng(seed)
    single = []
    for k, (shape, colour, size) in enumerate(itertools.product(SHAPE_NAMES, COLOUR_NAMES, SIZE_NAMES)):
        obj = PromptObject(colour, shape, size, str(rng.choice(list(MOTIONS))))
        background = str(rng.choice(BG_NAMES))
        single.append(PromptSpec(prompt_text(background, [obj], wording, k), background, (obj,)))
    double = []
    for k in range(two_object):
        colours = rng.choice(COLOUR_NAMES, 2, replace=False)
        shapes = rng.choice(SHAPE_NAMES, 2, replace=False)
        objs = tuple(PromptObject(str(c), str(s), str(rng.choice(SIZE_NAMES)), str(rng.choice(list(MOTIONS))))
                     for c, s in zip(colours, shapes, strict=True))
        background = str(rng.choice(BG_NAMES))
        double.append(PromptSpec(prompt_text(background, objs, wording, k), background, objs))
    return single, double


def render_prompt(spec: PromptSpec, seed: int, cfg: FrameConfig, tries: int = 200) -> np.ndarray:
    """A real key frame of the prompt's scene: positions drawn as ``sample_scene`` draws them, redrawn
    until every named object is at least 90% visible; colour jitter and specks as the collection."""
    rng = np.random.default_rng([seed, 555])
    for _ in range(tries):
        objects = []
        for o in spec.objects:
            rgb = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[o.colour][0])
            objects.append(SceneObject(shape=o.shape, colour=o.colour, size=o.size, motion=o.motion,
                                       start=_start_position(rng, o.motion), rgb=rgb))
        scene = Scene("prompt", spec.background, objects, int(rng.integers(0, 4)), int(rng.integers(0, 2**31 - 1)))
        if min(visible_fractions(scene, cfg)) >= 0.9:
            return key_frame(scene, cfg)
    raise ValueError(f"cannot place {spec.text!r} visibly in {tries} tries")


def render_prompts(specs: list, seed: int, cfg: FrameConfig) -> np.ndarray:
    from engine.portable import prompt_seed

    return np.stack([render_prompt(s, prompt_seed(s.text, seed), cfg) for s in specs])


# ---------------------------------------------------------------------------------------------
# The benchmark: generate, read, score, write


@dataclass
class FidelityConfig:
    teacher: str = "engine/weights/generator/teacher"
    student: str = "engine/weights/generator/students/4step"
    # (label, "teacher" | "student", steps, wording): the rows after "real frames"
    rows: tuple = (("teacher", "teacher", 28, "canonical"), ("teacher", "teacher", 4, "canonical"),
                   ("student-4step", "student", 4, "canonical"), ("student-4step", "student", 2, "canonical"),
                   ("student-4step", "student", 1, "canonical"), ("student-4step", "student", 4, "synonyms"))
    seeds: int = 2  # anchors per prompt (generation seeds 0..seeds-1)
    two_object: int = 48
    subsample: int = 1  # keep every n-th prompt (smoke runs)
    batch_size: int = 32
    grid_prompts: tuple = (0, 21, 40, 57, 74, 91, 96, 101)  # indexes into single + two-object prompts
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)


def _prompts(cfg: FidelityConfig, wording: str) -> tuple:
    single, double = prompt_set(cfg.two_object, wording)
    return single[::cfg.subsample], double[::cfg.subsample]


def run_fidelity(cfg: FidelityConfig, out_dir, encoder=None, classifier: Classifier | None = None,
                 progress: bool = True, info: dict | None = None) -> dict:
    """Train (or take) the classifier, read real renders and each row's anchors of the fixed prompt
    set, write generator_fidelity.{json,md,png} (and the classifier's weights) under out_dir."""
    from pathlib import Path

    from tqdm import tqdm

    from engine import files
    from engine.anchors import AnchorGenerator, GeneratorOptions

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if classifier is None:
        classifier = train_classifier(cfg.classifier, progress)
    classifier.save(out_dir / "generator_fidelity.classifier.safetensors")
    frame_cfg = classifier.config.frame
    canon = _prompts(cfg, "canonical")
    result_rows, grid = [], {}

    def scored(label, steps, wording, parts_images, specs_pair):
        row = {"model": label, "steps": steps, "wording": wording}
        for kind, images, specs in zip(("single", "two"), parts_images, specs_pair, strict=True):
            reading = classifier.read(images)
            row[kind] = score(reading, specs)
            if kind == "single":
                row["by_colour"] = {c: score(_pick(reading, specs, i, cfg.seeds), [s for s in specs if
                                              s.objects[0].colour == c])["colour"]
                                    for c, i in _groups(specs, "colour").items()}
                row["by_shape"] = {s_: score(_pick(reading, specs, i, cfg.seeds), [s for s in specs if
                                              s.objects[0].shape == s_])["shape"]
                                   for s_, i in _groups(specs, "shape").items()}
            if wording == "canonical":
                grid.setdefault(f"{label}@{steps}" if steps else label, {})[kind] = (images, reading)
        result_rows.append(row)
        return row

    # Real frames: held-out renders of the same prompts (other positions, jitter and noise per seed).
    real = [np.concatenate([render_prompts(specs, 1000 + s, frame_cfg) for s in range(cfg.seeds)]) for specs in canon]
    scored("real frames", None, "canonical", real, canon)
    # Floor: the same real frames read against a seeded shuffle of the prompts (chance level).
    shuffle = np.random.default_rng(PROMPT_SEED)
    shifted = tuple([specs[j] for j in shuffle.permutation(len(specs))] for specs in canon)
    scored("floor: real frames vs another prompt", None, "canonical", real, shifted)
    generators = {}
    folders = {"teacher": cfg.teacher, "student": cfg.student}
    for label, which, steps, wording in tqdm(cfg.rows, desc="fidelity rows", unit="row", disable=not progress):
        if which not in generators:
            generators[which] = AnchorGenerator.load(folders[which], GeneratorOptions(batch_size=cfg.batch_size),
                                                     device="cpu", text_encoder=encoder)
        gen = generators[which]
        specs_pair = _prompts(cfg, wording)
        t = time.time()
        images = [np.concatenate([gen.generate([s.text for s in specs], steps=steps, seed=seed)
                                  for seed in range(cfg.seeds)]) for specs in specs_pair]
        row = scored(label, steps, wording, images, specs_pair)
        row["generate_seconds"] = round(time.time() - t, 1)
    result = {"what": "prompt fidelity of the anchor generator (GenEval-style, issue 17 item 0)",
              "machine": info or {}, "seconds": round(time.time() - t0, 1),
              "classifier": {"config": asdict(classifier.config), **classifier.info},
              "seeds": cfg.seeds, "prompt_seed": PROMPT_SEED,
              "teacher": str(cfg.teacher), "student": str(cfg.student), "rows": result_rows,
              "prompts": {"single": [s.as_json() for s in canon[0]], "two": [s.as_json() for s in canon[1]],
                          "single_synonyms": [s.text for s in _prompts(cfg, "synonyms")[0]],
                          "two_synonyms": [s.text for s in _prompts(cfg, "synonyms")[1]]}}
    paths = {"json": out_dir / "generator_fidelity.json", "md": out_dir / "generator_fidelity.md",
             "png": out_dir / "generator_fidelity.png"}
    files.write_json(paths["json"], result)
    files.atomic_write(paths["md"], markdown(result))
    save_grid(paths["png"], grid, canon, cfg.grid_prompts)
    result["paths"] = {k: str(v) for k, v in paths.items()}
    return result


def _groups(specs: list, key: str) -> dict:
    out: dict = {}
    for i, s in enumerate(specs):
        out.setdefault(getattr(s.objects[0], key), []).append(i)
    return out


def _pick(reading: Reading, specs: list, idx: list, seeds: int) -> Reading:
    """The images of prompts idx (all seeds), ordered as score() expects: prompt set after prompt set."""
    rows = [seed * len(specs) + i for seed in range(seeds) for i in idx]
    return Reading(**{k: v[rows] for k, v in asdict(reading).items()})


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def markdown(result: dict) -> str:
    cols = ["colour", "shape", "size", "background", "colour+shape", "all"]
    head = ["model", "steps", "wording", *[f"{c} %" for c in cols], "extra colours / image"]

    def table(kind):
        return markdown_table(head, [
            [r["model"], r["steps"] or "", r["wording"], *[_pct(r[kind][c]) for c in cols],
             f"{r[kind]['extra_colours']:.2f}"] for r in result["rows"]])

    first = result["prompts"]["single"][0]["text"]
    two = result["prompts"]["two"][0]["text"]
    n1, n2 = len(result["prompts"]["single"]), len(result["prompts"]["two"])
    held = result["classifier"].get("held_out", {})
    by = [r for r in result["rows"] if r["wording"] == "canonical" and not r["model"].startswith("floor")]
    names = list(by[0]["by_colour"]) + list(by[0]["by_shape"])
    per = markdown_table(["row", *names], [
        [f"{r['model']}{'@' + str(r['steps']) if r['steps'] else ''}",
         *[_pct(r["by_colour"][n]) for n in r["by_colour"]], *[_pct(r["by_shape"][n]) for n in r["by_shape"]]]
        for r in by])
    return "\n".join([
        "# Prompt fidelity of the anchor generator", "",
        f"Single-object prompts ({n1} x {result['seeds']} seeds: every shape x colour x size, e.g. \"{first}\"):", "",
        table("single"),
        f"Two-object prompts ({n2} x {result['seeds']} seeds, distinct colours and shapes, e.g. \"{two}\"):", "",
        table("two"),
        "Single-object prompts, per named colour (colour found %) and per named shape (shape found %):", "",
        per,
        "Colour / shape: the named colour / shape is read present (multi-label). Size: the size read on the "
        "named colour's object (else on the object read most surely). Colour+shape: the named colour is "
        "present and its object has the named shape (binding). All: every named attribute of the prompt "
        "found. Extra colours: colours read that the prompt does not name. Real frames: held-out renders of "
        "the same prompts by `training.synthetic.render_clip` (the ceiling); floor: those frames read "
        "against a seeded shuffle of the prompts (chance level). Synonyms: the same scenes worded with the "
        "captions' other synonyms (\"a tiny crimson disc ...\").", "",
        f"Classifier: {result['classifier'].get('parameters')} parameters, trained on "
        f"{result['classifier']['config']['train_frames']} real key frames in "
        f"{result['classifier'].get('train_seconds')} s (one thread); on "
        f"{result['classifier']['config']['val_frames']} held-out real frames (the collection's 1-3 object "
        f"scenes): " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in held.items()) + ".", "",
        f"Machine: {result['machine'].get('description', '')}. Wall time {result['seconds']} s.", ""])


def save_grid(path, grid: dict, canon: tuple, picks) -> None:
    """PNG: one row per picked prompt, one column per row of the table (real frame first), each
    anchor titled with what the classifier read (green: every named attribute found)."""
    from bench.common import pyplot, save_figure_atomic

    plt = pyplot()
    specs = list(canon[0]) + list(canon[1])
    picks = [p for p in picks if p < len(specs)] or list(range(min(4, len(specs))))
    cols = [c for c in grid if not c.startswith("floor")]
    fig, axes = plt.subplots(len(picks), len(cols), figsize=(1.9 * len(cols), 1.75 * len(picks)), squeeze=False)
    for r, p in enumerate(picks):
        kind, i = ("single", p) if p < len(canon[0]) else ("two", p - len(canon[0]))
        spec = specs[p]
        for c, col in enumerate(cols):
            images, reading = grid[col][kind]
            ax = axes[r][c]
            ax.imshow(images[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ok = score_one(reading, i, spec)["all"][0]
            ax.set_xlabel("read: " + reading.describe(i).replace(", ", ",\n"), fontsize=5.5,
                          color="green" if ok else "red")
            if r == 0:
                ax.set_title(col, fontsize=7)
            if c == 0:
                words = spec.text.split()
                lines = [" ".join(words[k:k + 4]) for k in range(0, len(words), 4)]
                ax.set_ylabel("\n".join(lines), fontsize=5.5)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)
