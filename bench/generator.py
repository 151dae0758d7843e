"""Benchmark of the anchor generator per step count: latency, distance to the teacher, downstream R@1.

For each (model, steps) row -- the teacher at 1, 2, 4, 8 and 28 steps and every distilled student
at its own step count -- on the prompts of a split (fair query protocol: one anchor per caption):

- latency per image at batch 1 and batch 32, PyTorch eager, one thread (two threads on a shared
  2-core machine are 10-40x noisier); the text encoder is timed separately, because the retrieval
  model encodes the query anyway and the generator reuses those token states;
- optionally ONNX Runtime latency (``--onnx``: the teacher's transformer exported once with the
  dynamo exporter, dynamic batch and text length; ORT with one intra-op thread and spinning off;
  students have the same architecture, hence the same latency per step), with the largest pixel
  difference between the ORT and PyTorch anchors as the parity check;
- the distance to the teacher's 28-step anchors from the same noise: RMSE of pixels in [0, 1];
- the downstream R@1 of the full retrieval model with those anchors, when a scorer is given:
  ``run(..., downstream=fn)`` calls ``fn(generate) -> R@1`` per row, where ``generate(prompts)``
  returns that row's uint8 anchors (same model, step count and per-prompt seeds); the retrieval
  evaluator picks the prompts (the test captions), runs the ResNet-50 and scores. Without it the
  column says n/a (the retrieval model is written in parallel to this benchmark).

Writes a Markdown table, a JSON file and a PNG (anchors per step count, side by side).
``python -m bench.generator --tiny`` runs in seconds on random tiny models (for tests).

``--fidelity`` measures prompt fidelity instead (``bench/fidelity.py``: a classifier trained on real
built-in frames reads each anchor of a fixed prompt set; per attribute, the fraction of named
attributes found) and writes ``generator_fidelity.{md,json,png}`` plus the classifier's weights under
``bench/results/<machine>/`` (``--out`` overrides): unlike the latency table, which describes the
shipped weights (``engine/weights/generator/bench``), the scores come from a classifier trained and
sampled on a given machine and torch build, so they live with the other per-machine results.
``--fidelity --tiny`` is its seconds-long smoke run on random tiny models.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from engine import files
from engine.anchors import (
    BuiltinConfig,
    BuiltinFluxPipeline,
    Conditioning,
    euler_sample,
    image_ids,
    load_builtin_transformer,
    read_builtin_config,
)
from engine.portable import initial_noise, latents_to_images, pack_latents, prompt_seed, unpack_latents
from engine.tables import markdown_table

TEACHER_STEPS = (1, 2, 4, 8, 28)


def _time(fn, repeats: int) -> float:
    """Median seconds of fn() over repeats (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


class Sampler:
    """Euler sampling of one transformer on precomputed conditioning: the part that scales with steps,
    at the folder's classifier-free guidance (two transformer rows per image and step when not 1)."""

    def __init__(self, transformer, config: BuiltinConfig, velocity_model=None):
        self.model = velocity_model or transformer.eval()
        self.config = config
        self.guidance = float(config.guidance_scale)
        s = config.latent_size
        self.ids = image_ids(s, s)

    def noise(self, seeds):
        c, s = self.config.latent_channels, self.config.latent_size
        return torch.from_numpy(pack_latents(initial_noise(seeds, (c, s, s))))

    def __call__(self, cond: Conditioning, seeds, steps: int) -> np.ndarray:
        s = self.config.latent_size
        x = euler_sample(self.model, self.noise(seeds), cond, steps, self.ids, self.guidance)
        return latents_to_images(unpack_latents(x, s, s).float().numpy(), self.config.fold)


def _batch(cond: Conditioning, n: int) -> Conditioning:
    reps = -(-n // cond.tokens.shape[0])
    return Conditioning(cond.tokens.repeat(reps, 1, 1)[:n], cond.mask.repeat(reps, 1)[:n],
                        cond.pooled.repeat(reps, 1)[:n])


def _onnx_model(transformer, config: BuiltinConfig, cond: Conditioning, folder: Path):
    """Export the transformer (dynamo, dynamic batch and text length) and wrap an ORT session
    so that it can stand in for the transformer inside euler_sample."""
    import onnxruntime as ort

    from engine.anchors import flux_velocity

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, sigma, tokens, mask, pooled, img_ids):
            return flux_velocity(self.m, x, sigma, Conditioning(tokens, mask, pooled), img_ids)

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "transformer.onnx"
    b = torch.export.Dim("batch", min=1, max=1024)
    ln = torch.export.Dim("text", min=1, max=512)
    s = config.latent_size
    x = torch.randn(2, (s // 2) ** 2, config.in_channels)
    c = _batch(cond, 2)
    args = (x, torch.rand(2), c.tokens, c.mask, c.pooled, image_ids(s, s))
    shapes = ({0: b}, {0: b}, {0: b, 1: ln}, {0: b, 1: ln}, {0: b}, None)
    torch.onnx.export(Wrap(transformer.eval()), args, dynamic_shapes=shapes, dynamo=True).save(str(path))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    class OrtVelocity:
        config = transformer.config

        def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                     joint_attention_kwargs, return_dict=False):
            mask = joint_attention_kwargs["attention_mask"][:, 0, 0, : encoder_hidden_states.shape[1]]
            feeds = [hidden_states, timestep, encoder_hidden_states, mask, pooled_projections, img_ids]
            out = sess.run(None, {n: v.numpy() for n, v in zip(names, feeds, strict=True)})[0]
            return (torch.from_numpy(out),)

    return OrtVelocity()


def _generate_fn(pipe, sampler, steps: int, seed: int, batch: int):
    def generate(prompts):
        out = []
        for i in range(0, len(prompts), batch):
            chunk = list(prompts[i:i + batch])
            out.append(sampler(pipe.encode_prompt(chunk), [prompt_seed(p, seed) for p in chunk], steps))
        return np.concatenate(out)

    return generate


def run(teacher: str, students: dict, prompts: list, out_dir, encoder=None, downstream=None, repeats: int = 5,
        n_distance: int = 64, batch: int = 32, onnx: bool = False, grid_prompts: int = 8, seed: int = 0,
        frames: np.ndarray | None = None, measured_r1: dict | None = None) -> dict:
    """Benchmark; returns {"rows": [...], "machine": ..., "paths": ...}. ``downstream(generate)`` -> R@1
    (or None), called per row when given (see the module docstring). ``measured_r1`` maps
    "model@steps" (e.g. "teacher@28", "student-4step@4") to an R@1 measured elsewhere (a full
    model trained and evaluated on that row's anchors, see ``read_r1``)."""
    from training.generator import save_grid

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config, _ = read_builtin_config(teacher)
    pipe = BuiltinFluxPipeline(load_builtin_transformer(teacher), config, text_encoder=encoder)
    t = time.perf_counter()
    cond = pipe.encode_prompt(prompts[:n_distance])
    text_ms = (time.perf_counter() - t) / len(prompts[:n_distance]) * 1000
    one = cond.index(slice(0, 1))
    one_b1 = _time(lambda: pipe.encode_prompt(prompts[:1]), repeats) * 1000
    seeds = [prompt_seed(p, seed) for p in prompts[:n_distance]]
    models = [("teacher", teacher, n) for n in TEACHER_STEPS]
    models += [(f"student-{n}step", path, n) for n, path in sorted(students.items(), reverse=True)]
    samplers, ort_samplers = {}, {}
    tmp_dir = tempfile.mkdtemp(prefix="bench-onnx-")
    rows, reference, grid = [], None, {}
    for name, path, steps in sorted(models, key=lambda m: (m[0] != "teacher", -m[2])):
        if path not in samplers:  # each folder at its own recorded guidance (a student records 1)
            samplers[path] = Sampler(load_builtin_transformer(path), read_builtin_config(path)[0])
        sampler = samplers[path]
        images = sampler(cond, seeds, steps)
        if reference is None:  # the first row is the teacher at 28 steps
            reference = images.astype(np.float32) / 255
        rmse = float(np.sqrt(np.mean((images.astype(np.float32) / 255 - reference) ** 2)))
        cb = _batch(cond, batch)
        b1 = _time(lambda s=sampler, n=steps: s(one, seeds[:1], n), repeats) * 1000
        bn = _time(lambda s=sampler, n=steps, c=cb: s(c, list(range(batch)), n), max(1, repeats // 2)) * 1000 / batch
        row = {"model": name, "steps": steps, "ms_b1": round(b1, 2), f"ms_b{batch}": round(bn, 2),
               "rmse_to_teacher28": round(rmse, 4), "r_at_1": None, "guidance": sampler.guidance}
        if onnx and name == "teacher":  # students share the architecture, hence the ORT latency per step
            if path not in ort_samplers:  # one export per model (the dynamo export takes a while)
                ort_samplers[path] = Sampler(None, sampler.config, _onnx_model(sampler.model, config, cond,
                                                                    Path(tmp_dir) / str(len(ort_samplers))))
            ort = ort_samplers[path]
            row["ort_max_abs_diff"] = int(np.abs(ort(cond, seeds, steps).astype(int) - images.astype(int)).max())
            row["ort_ms_b1"] = round(_time(lambda o=ort, n=steps: o(one, seeds[:1], n), repeats) * 1000, 2)
            row[f"ort_ms_b{batch}"] = round(_time(lambda o=ort, n=steps, c=cb: o(c, list(range(batch)), n),
                                                  max(1, repeats // 2)) * 1000 / batch, 2)
        if downstream is not None:
            row["r_at_1"] = downstream(_generate_fn(pipe, sampler, steps, seed, batch))
        elif measured_r1 and f"{name}@{steps}" in measured_r1:
            row["r_at_1"] = measured_r1[f"{name}@{steps}"]
        rows.append(row)
        grid[f"{name}@{steps}"] = images[:grid_prompts]
    shutil.rmtree(tmp_dir, ignore_errors=True)
    base = next(r for r in rows if r["model"] == "teacher" and r["steps"] == 28)
    for r in rows:
        r["speedup_b1"] = round(base["ms_b1"] / r["ms_b1"], 1)
    result = {"machine": _machine(), "text_encoder_ms_b1": round(one_b1, 2),
              "text_encoder_ms_per_prompt_batched": round(text_ms, 2), "prompts": len(prompts[:n_distance]),
              "batch": batch, "image_size": config.image_size, "rows": rows}
    # PNG: one row per prompt, one column per (model, steps), left to right as in the table; the
    # video's real key frame first when given.
    if frames is not None:
        grid = {"key frame": frames[:grid_prompts], **grid}
    cols = list(grid)
    rows_png = [[grid[c][i] for c in cols] for i in range(min(grid_prompts, len(seeds)))]
    save_grid(out_dir / "generator_steps.png", rows_png, 3)
    files.atomic_write(out_dir / "generator_bench.md", markdown(result, cols))
    files.atomic_write(out_dir / "generator_bench.json", json.dumps(result, indent=1) + "\n")
    result["paths"] = {k: str(out_dir / v) for k, v in
                       (("png", "generator_steps.png"), ("md", "generator_bench.md"), ("json", "generator_bench.json"))}
    return result


def _guidance_note(rows: list) -> str:
    """Which rows sample with classifier-free guidance (rows written before it existed have none)."""
    guided = sorted({(r["model"], r["guidance"]) for r in rows if r.get("guidance", 1.0) != 1.0})
    return "".join(f" The {m} samples with classifier-free guidance {g:g}: two transformer rows per image and "
                   f"step, in its latencies." for m, g in guided)


def markdown(result: dict, columns) -> str:
    batch = result["batch"]
    has_ort = any("ort_ms_b1" in r for r in result["rows"])
    head = ["model", "steps", "ms/image b1", f"ms/image b{batch}", "speed-up b1 vs 28", "RMSE to teacher-28"]
    if has_ort:
        head += ["ORT ms b1", f"ORT ms b{batch}", "ORT max abs diff (0-255)"]
    head.append("R@1 (query protocol)")
    rows = []
    for r in result["rows"]:
        cells = [r["model"], r["steps"], r["ms_b1"], r[f"ms_b{batch}"], f"{r['speedup_b1']}x", r["rmse_to_teacher28"]]
        if has_ort:
            cells += [r.get("ort_ms_b1", ""), r.get(f"ort_ms_b{batch}", ""), r.get("ort_max_abs_diff", "")]
        cells.append("n/a" if r["r_at_1"] is None else r["r_at_1"])
        rows.append(cells)
    notes = (f"\nMachine: {result['machine']}. Latency = Euler sampling of the transformer on precomputed text "
             f"states ({result['image_size']} px anchors, pixels folded into channels: decoding is a reshape); "
             f"the MiniLM text encoder adds {result['text_encoder_ms_b1']} ms at batch 1 and is shared with the "
             f"retrieval model. RMSE: pixels in [0, 1], same noise, {result['prompts']} prompts. "
             f"PNG columns: {', '.join(columns)}.{_guidance_note(result['rows'])}\n")
    return markdown_table(head, rows) + notes


def refill(folder, measured_r1: dict) -> None:
    """Fill the R@1 column of an earlier run's table (its latencies are kept as measured): the
    downstream R@1 needs full models trained on each row's anchors, which takes far longer than the
    timing runs, so it is measured separately and joined here."""
    folder = Path(folder)
    result = json.loads((folder / "generator_bench.json").read_text())
    for row in result["rows"]:
        row["r_at_1"] = measured_r1.get(f"{row['model']}@{row['steps']}", row.get("r_at_1"))
    old_md = (folder / "generator_bench.md").read_text()
    columns = old_md.split("PNG columns: ", 1)[1].strip().rstrip(".").split(", ") if "PNG columns: " in old_md else []
    if measured_r1:
        result["r_at_1_source"] = "t2v R@1 on the test split of a full model trained on that row's anchors"
    files.atomic_write(folder / "generator_bench.json", json.dumps(result, indent=1) + "\n")
    files.atomic_write(folder / "generator_bench.md", markdown(result, columns))


def read_r1(specs: list) -> dict:
    """``["teacher@28=runs/eval_teacher28.json", ...]`` -> {"teacher@28": t2v R@1}: the JSON files are
    what ``cvr evaluate --out`` writes for a full model trained and tested on that row's anchors.
    Several files joined by commas (one per training seed) give their mean."""
    r1 = {}
    for spec in specs:
        row, sep, paths = spec.partition("=")
        if not sep or "@" not in row or not paths:
            raise SystemExit(f"--downstream wants MODEL@STEPS=EVAL_JSON[,EVAL_JSON...], got {spec!r}")
        values = []
        for path in paths.split(","):
            try:
                values.append(float(json.loads(Path(path).read_text())["metrics"]["t2v_r1"]))
            except (OSError, ValueError, KeyError) as error:
                raise SystemExit(f"--downstream {spec}: cannot read t2v R@1 from {path} ({error})") from None
        r1[row] = round(statistics.mean(values), 1)
    return r1


def _tiny(tmp: Path, guidance: float = 1.0):
    """Random tiny teacher (sampling at `guidance`) + 'student' folders and a hashed text stand-in
    (for tests, seconds)."""
    from engine.anchors import build_transformer, save_builtin
    from engine.text import TextFeatures

    class HashText:
        max_length = 8

        def __call__(self, texts):
            g = torch.Generator().manual_seed(0)
            table = torch.randn(64, 16, generator=g)
            ids = [[hash(w) % 64 for w in t.split()][:8] for t in texts]
            length = max(len(i) for i in ids)
            tokens = torch.zeros(len(texts), length, 16)
            mask = torch.zeros(len(texts), length, dtype=torch.bool)
            for i, row in enumerate(ids):
                tokens[i, : len(row)] = table[row]
                mask[i, : len(row)] = True
            return TextFeatures(tokens, mask, torch.nn.functional.normalize(tokens.sum(1), dim=-1))

    cfg = BuiltinConfig(image_size=8, fold=2, num_layers=1, num_single_layers=1, attention_head_dim=8,
                        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                        axes_dims_rope=(2, 2, 4))
    torch.manual_seed(0)
    teacher = save_builtin(tmp / "teacher", build_transformer(cfg), replace(cfg, guidance_scale=guidance))
    cfg.default_steps = 4
    student = save_builtin(tmp / "student", build_transformer(cfg), cfg)
    prompts = ["a red circle moves left", "a blue square", "green star on stripes", "white cross bounces"]
    return str(teacher), {4: str(student)}, prompts * 4, HashText()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.generator", description=__doc__.splitlines()[0])
    p.add_argument("--teacher", help="built-in teacher folder")
    p.add_argument("--student", action="append", default=[], help="N=FOLDER, a distilled N-step student")
    p.add_argument("--root")
    p.add_argument("--collection", default="synth")
    p.add_argument("--split", default="test")
    p.add_argument("--prompts", type=int, default=64, help="captions used for the distance and the grid")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--onnx", action="store_true", help="also time the transformer in ONNX Runtime")
    p.add_argument("--out", help="output folder (default: bench/results; with --fidelity bench/results/<machine>/)")
    p.add_argument("--fidelity", action="store_true",
                   help="prompt fidelity (bench/fidelity.py) of --teacher and --student 4=... "
                        "(default: the shipped ones)")
    p.add_argument("--seeds", type=int, default=2, help="--fidelity: anchors per prompt")
    p.add_argument("--classifier", metavar="FILE", help="--fidelity: reuse a trained classifier (.safetensors)")
    p.add_argument("--downstream", action="append", default=[], metavar="MODEL@STEPS=EVAL_JSON",
                   help="fill the R@1 column of a row from `cvr evaluate --out` JSON of a full model trained "
                        "on that row's anchors (e.g. teacher@28=runs/eval_teacher28.json)")
    p.add_argument("--tiny", action="store_true", help="random tiny models: a seconds-long smoke run")
    p.add_argument("--refill", metavar="DIR",
                   help="no timing: re-render DIR/generator_bench.{json,md} with the --downstream R@1 values")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.fidelity:
        return _fidelity(args)
    args.out = args.out or "bench/results"
    if args.refill:
        refill(args.refill, read_r1(args.downstream))
    elif args.tiny:
        tmp = Path(tempfile.mkdtemp(prefix="bench-gen-"))
        teacher, students, prompts, encoder = _tiny(tmp)
        run(teacher, students, prompts, args.out, encoder=encoder, repeats=1, n_distance=8,
                     batch=4, onnx=args.onnx, grid_prompts=4)
    else:
        if not args.teacher or not args.root:
            raise SystemExit("--teacher and --root are required (or --tiny)")
        from engine.datasets import Collection

        students = {}
        for spec in args.student:
            n, _, folder = spec.partition("=")
            students[int(n)] = folder
        from engine.datasets import video_id_of
        from training.generator import key_frame_paths, load_frames

        collection = Collection(args.root, args.collection)
        captions = collection.captions(args.split)
        picked = captions[:: max(1, len(captions) // args.prompts)][: args.prompts]
        prompts = [c for _, c in picked]
        size = read_builtin_config(args.teacher)[0].image_size
        frames = load_frames(key_frame_paths(collection, [video_id_of(c) for c, _ in picked[:8]]), size)
        run(args.teacher, students, prompts, args.out, repeats=args.repeats, n_distance=args.prompts,
            batch=args.batch, onnx=args.onnx, frames=frames, measured_r1=read_r1(args.downstream))
    print((Path(args.refill or args.out) / "generator_bench.md").read_text())
    return 0


def _fidelity(args) -> int:
    from bench import common
    from bench.fidelity import FidelityConfig, run_fidelity
    from bench.fidelity_classifier import Classifier, ClassifierConfig

    info = common.machine_info()
    info["description"] = common.describe_machine(info)
    out = common.results_dir(args.out, info)
    students = dict(spec.partition("=")[::2] for spec in args.student)
    if args.tiny:
        tmp = Path(tempfile.mkdtemp(prefix="bench-fid-"))
        teacher, tiny_students, _, encoder = _tiny(tmp)
        cfg = FidelityConfig(teacher=teacher, student=tiny_students[4], seeds=1, subsample=8, batch_size=8,
                             rows=(("teacher", "teacher", 2, "canonical"), ("student-4step", "student", 1, "canonical"),
                                   ("student-4step", "student", 1, "synonyms")),
                             grid_prompts=(0, 5, 12, 14),
                             classifier=ClassifierConfig(train_frames=200, val_frames=50, epochs=1, width=8))
    else:
        encoder = None
        cfg = FidelityConfig(teacher=args.teacher or str(common.TEACHER),
                             student=students.get("4", str(common.STUDENTS / "4step")), seeds=args.seeds)
    classifier = Classifier.load(args.classifier) if args.classifier else None
    run_fidelity(cfg, out, encoder=encoder, classifier=classifier, info=info)
    print((out / "generator_fidelity.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
