"""``cvr generator train|lora|distill`` (training/generator.py, training/distill.py) and ``cvr anchors``
(engine/anchor_store.py). Each handler raises ValueError (one-line message) on bad input; heavy
imports (torch, diffusers) happen inside the handlers, so building the parser is cheap.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from engine.cli.common import CLIError, add_overwrite, existing_dir, positive, set_threads
from engine.outputs import claim


def _print(summary: dict) -> None:
    print(json.dumps(summary, indent=1, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# cvr generator train


def _cmd_train(args) -> int:
    from engine.anchors import BuiltinConfig
    from training.generator import TeacherConfig, train_teacher

    existing_dir(os.path.join(args.root, args.collection), "collection")
    claim(args.out, "generator", "cvr generator train", args.overwrite)
    set_threads(args.threads)
    if not 0 <= args.cond_dropout < 1:
        raise CLIError(f"--cond-dropout must be in [0, 1), got {args.cond_dropout}")
    gcfg = BuiltinConfig(image_size=args.image_size, fold=args.fold, num_layers=args.double_blocks,
                         num_single_layers=args.single_blocks, text_encoder=args.text_encoder,
                         attention_head_dim=args.head_dim, num_attention_heads=args.heads,
                         axes_dims_rope=_rope_axes(args.head_dim), guidance_scale=args.guidance)
    cfg = TeacherConfig(root=args.root, out=args.out, collection=args.collection, split=args.split,
                        prompt=args.prompt, iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
                        seed=args.seed, checkpoint_every=args.checkpoint_every, cond_dropout=args.cond_dropout,
                        generator=gcfg, resume=args.resume, stop_after=args.stop_after, text_cache=args.text_cache,
                        shape_negatives=args.shape_negatives, edge_weight=args.edge_weight, init=args.init)
    _print(train_teacher(cfg, progress=not args.quiet))
    return 0


def _rope_axes(head_dim: int) -> tuple:
    """FLUX's 3-axis RoPE split of a head (16, 56, 56 of 128), scaled: (8, 12, 12) for the default 32."""
    if head_dim % 8:
        raise CLIError(f"--head-dim must be a multiple of 8, got {head_dim}")
    if head_dim == 32:
        return (8, 12, 12)
    side = (head_dim - head_dim // 4) // 2 // 2 * 2
    return (head_dim - 2 * side, side, side)


def _cmd_lora(args) -> int:
    from training.generator import LoraTrainConfig, train_lora

    existing_dir(args.base, "base generator")
    existing_dir(os.path.join(args.root, args.collection), "collection")
    claim(args.out, "lora", "cvr generator lora", args.overwrite)
    set_threads(args.threads)
    cfg = LoraTrainConfig(base=args.base, root=args.root, out=args.out, collection=args.collection, split=args.split,
                          prompt=args.prompt, rank=args.rank, iterations=args.iterations, batch_size=args.batch_size,
                          lr=args.lr, seed=args.seed, image_size=args.image_size)
    _print(train_lora(cfg, progress=not args.quiet))
    return 0


def _cmd_distill(args) -> int:
    from training.distill import DistillConfig, distill

    existing_dir(args.teacher, "teacher")
    claim(args.out, "students", "cvr generator distill", args.overwrite)
    set_threads(args.threads)
    cfg = DistillConfig(teacher=args.teacher, out=args.out, steps=sorted(set(args.steps), reverse=True),
                        start_steps=args.start_steps, iterations=args.iterations, batch_size=args.batch_size,
                        lr=args.lr, seed=args.seed, root=args.root, collection=args.collection, split=args.split,
                        prompt=args.prompt, guidance=args.guidance, text_cache=args.text_cache,
                        edge_weight=args.edge_weight, shape_guidance=args.shape_guidance,
                        shape_swaps=args.shape_swaps, direct=args.direct)
    _print(distill(cfg, progress=not args.quiet))
    return 0


def add_generator_commands(subparsers) -> argparse.ArgumentParser:
    """Add ``generator`` with sub-commands train, lora and distill."""
    gen = subparsers.add_parser("generator", help="train, LoRA-finetune and distill the anchor generator")
    sub = gen.add_subparsers(dest="generator_command", required=True)

    def common(p, iterations, batch, lr):
        p.add_argument("--iterations", type=positive("--iterations"), default=iterations)
        p.add_argument("--batch-size", type=positive("--batch-size"), default=batch)
        p.add_argument("--lr", type=float, default=lr)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=positive("--threads"), default=1)
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        add_overwrite(p, "--out")

    def data(p, prompt, required=True):
        p.add_argument("--root", required=required, help="data root holding the collection")
        p.add_argument("--collection", default="synth")
        p.add_argument("--split", default="train")
        p.add_argument("--prompt", choices=("caption", "ssss", "both"), default=prompt)

    t = sub.add_parser("train", help="train the built-in FLUX teacher with the rectified-flow loss")
    data(t, "both")
    t.add_argument("--out", required=True, help="generator folder to write (config.json + transformer/)")
    t.add_argument("--image-size", type=positive("--image-size"), default=32)
    t.add_argument("--fold", type=positive("--fold"), default=2, help="pixel_unshuffle factor (image space)")
    t.add_argument("--double-blocks", type=positive("--double-blocks"), default=2)
    t.add_argument("--single-blocks", type=positive("--single-blocks"), default=4)
    t.add_argument("--text-encoder", default=None, help="local HF encoder folder (default: packaged MiniLM)")
    t.add_argument("--heads", type=positive("--heads"), default=4, help="attention heads (width = heads x head dim)")
    t.add_argument("--head-dim", type=positive("--head-dim"), default=32)
    t.add_argument("--checkpoint-every", type=positive("--checkpoint-every"), default=500)
    t.add_argument("--cond-dropout", type=float, default=0.0,
                   help="caption dropout for classifier-free guidance: probability that a training row gets the "
                        "null conditioning (default 0: the recipe without guidance, unchanged)")
    t.add_argument("--guidance", type=float, default=1.0,
                   help="the classifier-free guidance scale the teacher samples at, recorded in its config "
                        "(default 1: one pass per step; other values need --cond-dropout > 0)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --out (its train_state/: model, EMA, optimizer, step, "
                        "RNG); starts afresh when --out has none. The recipe must be the same")
    t.add_argument("--stop-after", type=positive("--stop-after"), default=None,
                   help="stop after this iteration (with a checkpoint); the schedule is still --iterations' "
                        "(for runs split over sessions)")
    t.add_argument("--text-cache", default=None,
                   help="safetensors file for the encoded prompts: written once, read by later (resumed) runs")
    t.add_argument("--shape-negatives", type=float, default=0.0,
                   help="weight of the shape hard-negative hinge: the same noisy image under the caption with one "
                        "shape swapped must be predicted worse (training/shape_negatives.py; default 0: off)")
    t.add_argument("--edge-weight", type=float, default=0.0,
                   help="extra flow-loss weight on the edge pixels of each training image, so that outlines count "
                        "(training/generator_shared.edge_weights; default 0: plain MSE)")
    t.add_argument("--init", default=None,
                   help="generator folder whose weights start the run (continue a trained teacher; same "
                        "architecture flags)")
    common(t, 2000, 32, 1e-3)
    t.set_defaults(func=_cmd_train)

    lo = sub.add_parser("lora", help="LoRA-finetune a FLUX transformer (built-in or FLUX.1) with peft")
    lo.add_argument("--base", required=True, help="built-in generator folder or FLUX.1 diffusers folder")
    data(lo, "ssss")
    lo.add_argument("--out", required=True, help="folder for pytorch_lora_weights.safetensors")
    lo.add_argument("--rank", type=positive("--rank"), default=8)
    lo.add_argument("--image-size", type=positive("--image-size"), default=None,
                    help="real FLUX only: training resolution (default 512)")
    common(lo, 300, 16, 1e-3)
    lo.set_defaults(func=_cmd_lora)

    d = sub.add_parser("distill", help="progressive distillation of a built-in teacher to few steps")
    d.add_argument("--teacher", required=True)
    d.add_argument("--steps", type=positive("--steps"), nargs="+", default=[4])
    d.add_argument("--start-steps", type=positive("--start-steps"), default=32,
                   help="the teacher's fine grid: halved each stage down to the smallest --steps")
    d.add_argument("--out", required=True, help="folder: one student sub-folder per step count")
    data(d, "both", required=False)
    d.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance of the teacher in the first stage's targets (default: the "
                        "teacher's recorded scale); the students bake it in and record 1")
    d.add_argument("--text-cache", default=None, help="safetensors file for the encoded prompts")
    d.add_argument("--edge-weight", type=float, default=0.0,
                   help="extra weight on the edge pixels of each row's real image in the student's loss "
                        "(as cvr generator train --edge-weight; default 0: plain MSE)")
    d.add_argument("--shape-guidance", type=float, default=0.0,
                   help="shape-contrastive guidance W in the first stage's targets: the teacher's guided velocity "
                        "plus W (v_caption - v_caption with its shape swapped), baked into the students "
                        "(training/shape_negatives.py; default 0: plain guidance)")
    d.add_argument("--shape-swaps", type=int, default=2,
                   help="shape-swapped captions averaged per row by --shape-guidance (default 2)")
    d.add_argument("--direct", action="store_true",
                   help="first stage straight from --start-steps to the largest --steps (targets: that many teacher "
                        "Euler steps per student step), then halvings; default: halve every stage")
    common(d, 200, 32, 3e-4)
    d.set_defaults(func=_cmd_distill)
    return gen


# ---------------------------------------------------------------------------------------------
# cvr anchors


def _cmd_anchors(args) -> int:
    from engine.anchor_store import write_anchor_store
    from engine.anchors import AnchorGenerator, GeneratorOptions
    from engine.datasets import Collection, video_id_of
    from engine.paths import reference, weights_reference
    from engine.vision import RegionExtractor, VisionConfig

    existing_dir(args.generator, "generator")
    existing_dir(os.path.join(args.root, args.collection), "collection")
    claim(args.out, "anchor store", "cvr anchors", args.overwrite)
    if args.png:
        claim(args.png, "anchor pngs", "cvr anchors --png", args.overwrite)
    if args.png and args.features == "latent":
        raise CLIError("--png writes decoded anchors: a --features latent store decodes none")
    if args.protocol not in ("query", "ssss"):
        raise CLIError(f"--prompt must be 'query' or 'ssss', got {args.protocol!r}")
    set_threads(args.threads)
    collection = Collection(args.root, args.collection)
    # One store may cover several splits ("train,val,test"): training reads train and val anchors
    # from the store it is given, evaluation the test ones.
    captions = [pair for split in args.split.split(",") for pair in collection.captions(split.strip())]
    if not captions:
        raise CLIError(f"split {args.split!r} has no captions")
    options = GeneratorOptions(steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                               adapters=[(p, 1.0) for p in args.lora or []])
    generator = AnchorGenerator.load(args.generator, options, device=args.device, cache_dir=args.cache)
    if args.protocol == "query":
        ids = [c for c, _ in captions]
        prompts = [t for _, t in captions]
    else:
        from training.ssss import super_sentences

        by_video: dict[str, list[str]] = {}
        for cap_id, text in captions:
            by_video.setdefault(video_id_of(cap_id), []).append(text)
        count = None
        max_tokens = 32
        if generator.kind == "builtin":
            enc = generator.backend.text_encoder
            count, max_tokens = (lambda t: len(enc.tokenizer(t)["input_ids"])), enc.max_length
        sentences = super_sentences(by_video, max_tokens, count)
        ids, prompts = list(sentences), list(sentences.values())
    if args.limit:
        ids, prompts = ids[: args.limit], prompts[: args.limit]
    if args.workers > 1:
        return _anchors_in_parallel(args, len(ids))
    if args.shard:
        ids, prompts = _shard(ids, args.shard), _shard(prompts, args.shard)
    meta = {"protocol": args.protocol, "collection": args.collection, "split": args.split,
            "generator": reference(args.generator, args.out)}
    extractor = None
    if args.features == "pixels":  # a latent store decodes no image and runs no ResNet
        weights = args.vision_weights
        vision = VisionConfig(image_size=args.image_size, weights=weights)
        extractor = RegionExtractor.from_config(vision, device=args.device or "cpu")
        meta["vision_weights"] = weights_reference(weights, args.out)
    write_anchor_store(args.out, generator, extractor, ids, prompts, meta, steps=args.steps, seed=args.seed,
                       batch_size=args.batch_size, png_dir=args.png, progress=not args.quiet,
                       anchors=args.anchors_per_query, features=args.features)
    print(f"wrote {len(ids)} anchors ({args.protocol} protocol) to {args.out}{_per_id(args)}")
    return 0


def _per_id(args) -> str:
    n = args.anchors_per_query
    return f" ({n} per id, seeds {args.seed}..{args.seed + n - 1})" if n > 1 else ""


def _shard(items: list, shard: tuple) -> list:
    """The `index`-th of `count` contiguous, near-equal slices (shard order = id order)."""
    index, count = shard
    bounds = [len(items) * i // count for i in range(count + 1)]
    return items[bounds[index] : bounds[index + 1]]


def _parse_shard(text: str) -> tuple:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants I/N, got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text}: I must be in 0..N-1")
    return index, count


def _anchors_in_parallel(args, n_ids: int) -> int:
    """`--workers N`: N processes of one thread each draw contiguous shards of the ids into temporary
    stores next to --out, which are then concatenated into --out: the store a single process would
    write (same ids and anchors; the floats differ only by the rounding of other batch groupings).
    Worth it on a multi-core CPU, where one thread per process is also the least noisy way to use
    the cores."""
    from engine import locks

    workers = min(args.workers, n_ids)
    with locks.lock(args.out):  # the shards' staging folder is this writer's work in flight
        return _draw_in_parallel(args, n_ids, workers)


def _draw_in_parallel(args, n_ids: int, workers: int) -> int:
    import subprocess

    from engine import files
    from engine.anchor_store import merge_anchor_stores

    # The shards live in a staging folder beside --out: a killed run's is cleaned by the next writer.
    parts_dir = files.make_staging(args.out)
    parts = [os.path.join(parts_dir, str(i)) for i in range(workers)]
    children = []
    print(f"drawing {n_ids} anchors in {workers} worker processes", flush=True)
    try:
        for i in range(workers):
            argv = [sys.executable, "-m", "engine.cli", "anchors", *_anchor_argv(args), "--shard", f"{i}/{workers}",
                    "--out", parts[i], "--quiet"]
            log = open(parts[i] + ".log", "w", encoding="utf-8")  # noqa: SIM115 (closed below)
            children.append((subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL),
                             log))
        _wait_all(children, parts)
        merge_anchor_stores(parts, args.out)
    finally:
        for child, log in children:
            if child.poll() is None:
                child.kill()
                child.wait()
            log.close()
        files.remove(parts_dir)
    print(f"wrote {n_ids} anchors ({args.protocol} protocol) to {args.out}{_per_id(args)} ({workers} worker "
          "processes)")
    return 0


def _wait_all(children: list, parts: list) -> None:
    for (child, _), part in zip(children, parts, strict=True):
        if child.wait():
            with open(part + ".log", encoding="utf-8", errors="replace") as handle:
                lines = [line.strip() for line in handle if line.strip()]
            raise CLIError(f"an anchors worker failed: {lines[-1] if lines else 'exit ' + str(child.returncode)}")


def _anchor_argv(args) -> list:
    """The command line of one worker: the same settings, one thread, no progress bars."""
    argv = ["--generator", args.generator, "--root", args.root, "--collection", args.collection, "--split",
            args.split, "--prompt", args.protocol, "--image-size", str(args.image_size), "--seed", str(args.seed),
            "--batch-size", str(args.batch_size), "--threads", "1", "--anchors-per-query", str(args.anchors_per_query),
            "--features", args.features]
    for flag, value in (("--steps", args.steps), ("--png", args.png), ("--cache", args.cache),
                        ("--vision-weights", args.vision_weights), ("--limit", args.limit or None),
                        ("--device", args.device)):
        if value is not None:
            argv += [flag, str(value)]
    if args.lora:
        argv += ["--lora", *args.lora]
    return argv


def add_anchors_command(subparsers) -> argparse.ArgumentParser:
    a = subparsers.add_parser("anchors", help="generate the anchor store (region grids of anchor images)")
    a.add_argument("--generator", required=True, help="generator folder (built-in or FLUX.1 diffusers)")
    a.add_argument("--root", required=True)
    a.add_argument("--collection", default="synth")
    a.add_argument("--split", default="test", help="a split, or several joined by commas (train,val,test)")
    a.add_argument("--prompt", dest="protocol", default="query",
                   help="query: one anchor per caption (fair); ssss: one per video from all its captions")
    a.add_argument("--steps", type=positive("--steps"), default=None, help="default: the generator's own")
    a.add_argument("--out", required=True, help="anchor store folder (BigFile + anchor_meta.json)")
    a.add_argument("--png", default=None, help="also write each anchor as a PNG into this folder")
    a.add_argument("--lora", nargs="*", default=None, help="LoRA files or folders to fuse")
    a.add_argument("--cache", default=None, help="on-disk anchor cache folder")
    a.add_argument("--image-size", type=positive("--image-size"), default=64, help="ResNet-50 input size")
    a.add_argument("--vision-weights", default=None, help="None: built-in extractor; 'random'; a path")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--anchors-per-query", type=positive("--anchors-per-query"), default=1, metavar="N",
                   help="N anchors per id, drawn with seeds SEED..SEED+N-1 (the query tower reads them jointly; "
                        "default 1)")
    a.add_argument("--features", choices=("pixels", "latent"), default="pixels",
                   help="pixels: ResNet-50 regions of the decoded anchor (default); latent: the generator's final "
                        "latent tokens as regions, no decoding and no ResNet (\"anchor from generator features\")")
    a.add_argument("--batch-size", type=positive("--batch-size"), default=32)
    a.add_argument("--limit", type=int, default=0, help="only the first N ids (smoke tests)")
    a.add_argument("--device", default=None)
    a.add_argument("--threads", type=positive("--threads"), default=1)
    a.add_argument("--workers", type=positive("--workers"), default=1,
                   help="processes of one thread each drawing shards of the ids in parallel (default 1)")
    a.add_argument("--shard", type=_parse_shard, default=None, help=argparse.SUPPRESS)  # I/N: a worker's part
    a.add_argument("--quiet", action="store_true")
    add_overwrite(a, "--out and --png")
    a.set_defaults(func=_cmd_anchors)
    return a


def add(sub) -> None:
    add_generator_commands(sub)
    add_anchors_command(sub)
