"""`cvr`: the engine's one entry point. `main(argv)` returns an exit code, so tests can call it.

Sub-commands import their modules lazily: `cvr --help` stays fast and a sub-command only pays for
what it uses (training/ and export/ are imported only by theirs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# cvr data ...


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="the built-in data set and collections in the MSR-VTT layout")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    synth = data_sub.add_parser("synth", help="write the built-in synthetic video-caption collection")
    synth.add_argument("--root", required=True, help="folder that will hold the collection")
    synth.add_argument("--collection", default="synth", help="collection name (default: synth)")
    synth.add_argument("--videos", type=int, default=600, help="number of clips (default: 600)")
    synth.add_argument("--frames", type=int, default=8, help="frames per clip (default: 8)")
    synth.add_argument("--size", type=int, default=64, help="frame side in pixels (default: 64)")
    synth.add_argument("--captions", type=int, default=10, help="captions per clip (default: 10)")
    synth.add_argument("--seed", type=int, default=0, help="random seed: same seed, same bytes")
    synth.add_argument("--vision-weights", default=None,
                       help="ResNet-50 weights: a local HF folder, a torchvision state dict, or 'random' "
                            "(default: the shipped built-in extractor)")
    synth.add_argument("--threads", type=int, default=1,
                       help="torch threads for feature extraction (default 1: on a small shared machine more "
                            "threads are slower and far noisier)")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=_cmd_data_synth)

    summary = data_sub.add_parser("summary", help="summarise a collection in the MSR-VTT layout")
    summary.add_argument("--root", required=True)
    summary.add_argument("--collection", required=True)
    summary.add_argument("--feature", default="resnet50", help="feature folder under FeatureData/")
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")
    summary.set_defaults(func=_cmd_data_summary)


def _cmd_data_synth(args) -> int:
    import torch

    from engine.vision import RegionExtractor, VisionConfig
    from training.synthetic import SynthConfig, write_collection

    config = SynthConfig(videos=args.videos, frames=args.frames, size=args.size, seed=args.seed,
                         captions_per_video=args.captions, collection=args.collection)
    config.validate()
    torch.set_num_threads(args.threads)
    vision = RegionExtractor.from_config(VisionConfig(image_size=args.size, weights=args.vision_weights))
    summary = write_collection(args.root, config, vision=vision, progress=not args.quiet)
    print(format_summary(summary, os.path.join(args.root, args.collection)))
    return 0


def _cmd_data_summary(args) -> int:
    from engine.datasets import Collection

    summary = Collection(args.root, args.collection).summary(args.feature)
    if args.json:
        print(json.dumps(summary, indent=1, sort_keys=True))
    else:
        print(format_summary(summary, os.path.join(args.root, args.collection)))
    return 0


def format_summary(summary: dict, where: str) -> str:
    """A collection summary as a Markdown table: one row per field, one per split."""
    lines = [f"collection: {where}", "", "| field | value |", "|---|---|"]
    for key, value in summary.items():
        if key == "splits" and isinstance(value, dict):
            for split, counts in value.items():
                text = "missing" if counts is None else ", ".join(f"{v} {k}" for k, v in counts.items() if v)
                lines.append(f"| {split} split | {text} |")
        elif isinstance(value, dict):
            lines.append(f"| {key} | " + ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()) + " |")
        else:
            lines.append(f"| {key} | {_fmt(value)} |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------
# cvr vision ...


def _add_vision(sub) -> None:
    vision = sub.add_parser("vision", help="the ResNet-50 extractor: train the built-in one, probe features")
    vision_sub = vision.add_subparsers(dest="vision_command", required=True)

    train = vision_sub.add_parser("train", help="train the built-in extractor's BatchNorm layers")
    train.add_argument("--out", required=True, help="output .safetensors file")
    train.add_argument("--clips", type=int, default=600)
    train.add_argument("--epochs", type=int, default=4)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--trained-stages", type=int, default=3,
                       help="train the stem and stages below this (0: BatchNorm only; 5: everything)")
    train.add_argument("--seed", type=int, default=0, help="seed of the random convolutions")
    train.add_argument("--threads", type=int, default=1)
    train.set_defaults(func=_cmd_vision_train)

    probe = vision_sub.add_parser("probe", help="linear probe: do the features tell colour, shape, motion?")
    probe.add_argument("--vision-weights", default=None, help="as for `cvr data synth` (default: built-in)")
    probe.add_argument("--clips", type=int, default=240)
    probe.add_argument("--size", type=int, default=64)
    probe.add_argument("--json", default=None, help="also write the result to this JSON file")
    probe.set_defaults(func=_cmd_vision_probe)


def _cmd_vision_train(args) -> int:
    from training.vision import ExtractorTrainConfig, train_extractor

    config = ExtractorTrainConfig(clips=args.clips, epochs=args.epochs, lr=args.lr, seed=args.seed,
                                  threads=args.threads, trained_stages=args.trained_stages)
    log = train_extractor(config, args.out)
    for row in log["log"]:
        print(f"epoch {row['epoch']}: loss {row['loss']:.4f} ({row['seconds']} s)")
    print(f"wrote {args.out}")
    return 0


def _cmd_vision_probe(args) -> int:
    import torch

    from engine.vision import RegionExtractor, VisionConfig
    from training.vision import probe_features

    torch.set_num_threads(1)
    extractor = RegionExtractor.from_config(VisionConfig(image_size=args.size, weights=args.vision_weights))
    result = probe_features(extractor, n_clips=args.clips, size=args.size)
    print(result.table())
    if args.json:
        from dataclasses import asdict

        _write_json_atomic(args.json, asdict(result))
    return 0


# ---------------------------------------------------------------------------------------------
# cvr train / cvr evaluate


def _add_train(sub) -> None:
    train = sub.add_parser("train", help="train the retrieval model (text-only or with an anchor store)")
    train.add_argument("--root", required=True)
    train.add_argument("--collection", required=True)
    train.add_argument("--feature", default="resnet50", help="frame feature folder under FeatureData/")
    train.add_argument("--out", required=True, help="checkpoint folder to write")
    train.add_argument("--anchors", default="none",
                       help="'none' (text-only) or an anchor store folder written by `cvr anchors`")
    train.add_argument("--text-encoder", default="minilm",
                       help="'minilm' (shipped), 'rivrl' (BoW+BiGRU+CNN, RIVRL parity) or a local HF folder")
    train.add_argument("--finetune-text", action="store_true", help="finetune the MiniLM/HF encoder")
    train.add_argument("--word2vec", default=None, help="word2vec BigFile to initialise the RIVRL encoder")
    train.add_argument("--vocab-min-count", type=int, default=5, help="RIVRL vocabulary threshold")
    train.add_argument("--epochs", type=int, default=50)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=1)
    train.add_argument("--tag-vocab-size", type=int, default=512)
    train.add_argument("--max-frames", type=int, default=64)
    for name, default in (("latent-dim", 1024), ("attn-dim", 512), ("video-gru-hidden", 512),
                          ("video-local-dim", 1024)):
        train.add_argument(f"--{name}", type=int, default=default)
    train.add_argument("--attention", default="hybrid", choices=["hybrid", "spatial", "channel", "meanpool"])
    train.add_argument("--no-local-branch", action="store_true")
    train.add_argument("--no-concept-space", action="store_true")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser("evaluate", help="metrics of a checkpoint on one split")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--root", required=True)
    evaluate.add_argument("--collection", required=True)
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument("--anchors", default=None, help="anchor store (for a model trained with anchors)")
    evaluate.add_argument("--feature", default=None, help="default: the feature the checkpoint was trained on")
    evaluate.add_argument("--transductive", action="store_true",
                          help="RIVRL's min-max over the whole test matrix (parity only)")
    evaluate.add_argument("--out", default=None, help="write <out>.json and <out>.md (default: beside the checkpoint)")
    evaluate.set_defaults(func=_cmd_evaluate)


def _text_config(args) -> dict:
    if args.text_encoder == "minilm":
        return {"kind": "minilm", "finetune": args.finetune_text}
    if args.text_encoder == "rivrl":
        config = {"kind": "rivrl", "vocab_min_count": args.vocab_min_count}
        if args.word2vec:
            config["word2vec"] = args.word2vec
        return config
    if not os.path.isdir(args.text_encoder):
        raise CLIError(f"--text-encoder: {args.text_encoder} is neither minilm, rivrl nor a folder")
    return {"kind": "minilm", "path": os.path.abspath(args.text_encoder), "finetune": args.finetune_text}


def _cmd_train(args) -> int:
    from engine.config import ModelConfig, TrainConfig
    from training.retrieval import RetrievalJob, train_retrieval

    anchors = None if args.anchors == "none" else args.anchors
    if anchors is not None and not os.path.isdir(anchors):
        raise CLIError(f"--anchors: no anchor store at {anchors}")
    model_config = ModelConfig(
        text=_text_config(args), latent_dim=args.latent_dim, attn_dim=args.attn_dim,
        video_gru_hidden=args.video_gru_hidden, video_local_dim=args.video_local_dim, attention=args.attention,
        local_branch=not args.no_local_branch, concept_space=not args.no_concept_space,
    )
    train_config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                               threads=args.threads)
    job = RetrievalJob(root=args.root, collection=args.collection, feature=args.feature, out=args.out,
                       anchors=anchors, tag_vocab_size=args.tag_vocab_size, max_frames=args.max_frames,
                       progress=not args.quiet)
    result = train_retrieval(job, model_config, train_config)
    print(f"wrote {result['checkpoint']} (best validation criterion {result['best_criterion']:.1f})")
    return 0


def _cmd_evaluate(args) -> int:
    from engine.metrics import format_metrics_table
    from training.retrieval import evaluate_checkpoint

    out = args.out or os.path.join(args.checkpoint, f"eval_{args.collection}_{args.split}")
    result = evaluate_checkpoint(args.checkpoint, args.root, args.collection, args.split, anchors=args.anchors,
                                 feature=args.feature, transductive=args.transductive, out=out)
    print(f"{args.collection} {args.split}: {result['queries']} queries, {result['videos']} videos")
    print(format_metrics_table(result["metrics"]))
    print(f"wrote {out}.json and {out}.md")
    return 0


# ---------------------------------------------------------------------------------------------
# cvr search


def _add_search(sub) -> None:
    search = sub.add_parser("search", help="ranked videos for text queries over a gallery")
    search.add_argument("query", nargs="*", help="query text(s); or use --queries FILE")
    search.add_argument("--gallery", required=True)
    search.add_argument("--checkpoint", required=True)
    search.add_argument("-k", type=int, default=10, help="videos per query (default 10)")
    search.add_argument("--queries", default=None, help="a UTF-8 file with one query per line")
    search.add_argument("--json", action="store_true", help="print JSON instead of tables")
    search.add_argument("--backend", default="torch", choices=["torch", "triton", "onnxruntime", "tensorrt"])
    search.add_argument("--export", default=None,
                        help="export folder for onnxruntime / tensorrt (default: made or reused in CHECKPOINT/onnx)")
    search.add_argument("--generator", default=None, help="anchor generator folder (full model only)")
    search.add_argument("--steps", type=int, default=None, help="anchor sampling steps (default: the generator's)")
    search.add_argument("--anchor-cache", default=None, help="folder for the on-disk anchor cache")
    search.add_argument("--device", default="cpu")
    search.set_defaults(func=_cmd_search)


def _read_queries(args) -> list:
    texts = list(args.query)
    if args.queries:
        try:
            with open(args.queries, encoding="utf-8") as handle:
                texts += [line.rstrip("\n") for line in handle if line.strip()]
        except UnicodeDecodeError as error:
            raise CLIError(f"{args.queries}: not UTF-8 text (byte {error.start})") from None
        except OSError as error:
            raise CLIError(f"{args.queries}: cannot read ({error.strerror})") from None
    if not texts:
        raise CLIError("no query: give query text or --queries FILE")
    return texts


def _cmd_search(args) -> int:
    from engine.retriever import Retriever

    texts = _read_queries(args)
    Retriever.clean_queries(texts)  # reject empty queries before loading anything
    retriever = Retriever(args.checkpoint, args.gallery, backend=args.backend, generator=args.generator,
                          device=args.device, steps=args.steps, anchor_cache=args.anchor_cache, export_dir=args.export)
    results = retriever.search(texts, k=args.k)
    if args.json:
        print(json.dumps([{"query": r.query, "anchor": r.anchor,
                           "results": [{"rank": i + 1, "video_id": v, "score": s} for i, (v, s) in enumerate(r.hits)]}
                          for r in results], indent=1))
        return 0
    for result in results:
        print(f"query: {result.query}")
        print("| rank | video id | score |" + (" anchor |" if result.anchor else ""))
        print("|---:|---|---:|" + ("---|" if result.anchor else ""))
        for rank, (video, score) in enumerate(result.hits, start=1):
            print(f"| {rank} | {video} | {score:.4f} |" + (f" {result.anchor} |" if result.anchor else ""))
        print()
    per_query = retriever.last_timings.per_query_ms()
    print("latency per query (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in per_query.items()))
    if retriever.engine is not None:  # onnxruntime-gpu may fall back to the CPU: say what ran
        print(f"{args.backend}: {retriever.engine.provider}")
    return 0


# ---------------------------------------------------------------------------------------------
# cvr demo


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="the end-to-end demo on the built-in set (what `make demo` runs)")
    demo.add_argument("--out", default="runs/demo", help="working folder (default: runs/demo)")
    demo.add_argument("--videos", type=int, default=600)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=10,
                      help="training epochs (default 10: most of the gain on the built-in set, in minutes)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)


SHIPPED_STUDENT = os.path.join(os.path.dirname(__file__), "weights", "generator", "students", "4step")


def _cmd_demo(args) -> int:
    """Built-in data set -> text-only model and full model (anchors from the shipped 4-step student)
    -> test metrics of both -> gallery -> search with per-stage latency.

    Every process runs one torch thread, and the work is spread over two: the anchors are drawn by
    two worker processes, then the text-only model trains in a second process while this one trains
    the full model, so a 2-core machine is kept busy without oversubscribing it."""
    import time

    import torch

    torch.set_num_threads(1)  # one thread: on a small shared machine more threads are slower and noisier
    clock = _StageClock()
    print("== 1. the built-in data set ==", flush=True)
    root, collection = _demo_data(args)
    clock.lap("data")
    quiet = ["--quiet"] if args.quiet else []
    common = ["--root", root, "--collection", collection]
    train = ["train", *common, "--epochs", str(args.epochs), "--seed", str(args.seed), *quiet]

    print("\n== 2. anchors from the shipped 4-step student (fair query protocol), two worker processes ==",
          flush=True)
    anchors = os.path.join(args.out, "anchors_student4")
    if code := main(["anchors", "--generator", SHIPPED_STUDENT, *common, "--split", "train,val,test",
                     "--prompt", "query", "--out", anchors, "--cache", os.path.join(args.out, "anchor_cache"),
                     "--workers", "2", *quiet]):
        return code
    clock.lap("anchors")

    print("\n== 3. the text-only model (MiniLM text encoder, RIVRL video tower) in a second process, "
          "and the full model ==", flush=True)
    text_only = os.path.join(args.out, "text_only")
    background = _start_background([*train, "--quiet", "--out", text_only], text_only + ".log")
    print(f"text-only model: training in the background; its log: {text_only}.log", flush=True)
    try:
        full = os.path.join(args.out, "full")
        if code := main([*train, "--out", full, "--anchors", anchors]):
            return code
        clock.lap("full model")
        waited = time.perf_counter()
        code = background.wait()
    finally:
        if background.poll() is None:  # an error or ^C above: do not leave an orphan training
            background.kill()
            background.wait()
    print(f"\ntext-only model (waited {time.perf_counter() - waited:.0f} s for it); the end of its log:")
    print(_tail(text_only + ".log", 3))
    if code:
        raise CLIError(f"training the text-only model failed (exit {code}); see {text_only}.log")
    clock.lap("text-only model (wait)")

    print("\n== 4. test metrics ==", flush=True)
    rows = _demo_metrics(args.out, root, collection, [("text-only", text_only, None), ("full", full, anchors)])
    print(rows)
    clock.lap("metrics")

    print("\n== 5. index the test split, then search with the full model ==", flush=True)
    gallery = os.path.join(args.out, "gallery_full")
    if code := main(["index", "--checkpoint", full, *common, "--split", "test", "--out", gallery, "--quiet"]):
        return code
    test_captions = _collection(root, collection).captions("test")
    examples = [caption for _, caption in test_captions[:: max(1, len(test_captions) // 3)]][:3]
    k = str(min(5, len(_collection(root, collection).split_video_ids("test"))))
    code = main(["search", "--gallery", gallery, "--checkpoint", full, "-k", k,
                 "--anchor-cache", os.path.join(args.out, "anchor_cache"), *examples])
    clock.lap("index + search")
    print("\n" + clock.summary(), flush=True)
    return code


class _StageClock:
    """Wall time per demo stage, printed at the end so a user sees where the minutes go."""

    def __init__(self):
        import time

        self._now = time.perf_counter
        self.start = self.last = self._now()
        self.stages = []

    def lap(self, name: str) -> None:
        now = self._now()
        self.stages.append((name, now - self.last))
        self.last = now

    def summary(self) -> str:
        parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.stages)
        return f"demo wall time: {self._now() - self.start:.0f} s ({parts})"


def _start_background(argv: list, log_path: str):
    """`cvr <argv>` in a child process (its own interpreter and one torch thread), output to a log."""
    import subprocess

    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        return subprocess.Popen([sys.executable, "-m", "engine.cli", *argv], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def _tail(path: str, lines: int) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return "".join(handle.readlines()[-lines:]).rstrip()


def _collection(root: str, name: str):
    from engine.datasets import Collection

    return Collection(root, name)


def _demo_data(args) -> tuple:
    from training.synthetic import SynthConfig, write_collection

    config = SynthConfig(videos=args.videos, seed=args.seed)
    root = os.path.join(args.out, "data")
    collection_dir = os.path.join(root, config.collection)
    if _same_synth_config(collection_dir, config):
        print(f"reusing {collection_dir} (same configuration)")
        summary = _collection(root, config.collection).summary(config.feature)
    else:
        summary = write_collection(root, config, progress=not args.quiet)
    print(format_summary(summary, collection_dir))
    return root, config.collection


def _demo_metrics(out: str, root: str, collection: str, models: list) -> str:
    """One Markdown table, a row per model, with the chance level of the split."""
    from training.retrieval import evaluate_checkpoint

    lines = ["| model | t2v R@1 | R@5 | R@10 | MedR | mAP | v2t R@1 | R@5 | R@10 | SumR |", "|---" * 10 + "|"]
    for name, checkpoint, anchors in models:
        result = evaluate_checkpoint(checkpoint, root, collection, "test", anchors=anchors,
                                     out=os.path.join(out, f"{os.path.basename(checkpoint)}_test"))
        m = result["metrics"]
        lines.append(f"| {name} | {m['t2v_r1']:.1f} | {m['t2v_r5']:.1f} | {m['t2v_r10']:.1f} | {m['t2v_medr']:.1f} "
                     f"| {m['t2v_map']:.3f} | {m['v2t_r1']:.1f} | {m['v2t_r5']:.1f} | {m['v2t_r10']:.1f} "
                     f"| {m['sumr']:.1f} |")
    chance = 100.0 / result["videos"]
    lines.append(f"| chance | {chance:.1f} | {min(100, 5 * chance):.1f} | {min(100, 10 * chance):.1f} | | | | | | |")
    header = f"built-in test split: {result['queries']} queries, {result['videos']} videos"
    return header + "\n" + "\n".join(lines)


def _same_synth_config(collection_dir: str, config) -> bool:
    from dataclasses import asdict

    path = os.path.join(collection_dir, "synth_config.json")
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as handle:
        stored = json.load(handle)
    return stored == json.loads(json.dumps(asdict(config)))


# ---------------------------------------------------------------------------------------------


def _write_json_atomic(path: str, value) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1, sort_keys=True)
        handle.write("\n")
    os.replace(temporary, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvr", description="CVR-SDGM text-to-video retrieval engine")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data(sub)
    _add_vision(sub)
    _add_train(sub)
    from engine.gallery import add_index_command

    add_index_command(sub)
    _add_search(sub)
    from export.cli import add_export_command

    add_export_command(sub)
    # The generator's sub-commands live with the generator's training code (imported lazily there).
    from training.generator_cli import add_anchors_command, add_generator_commands

    add_generator_commands(sub)
    add_anchors_command(sub)
    _add_demo(sub)
    return parser


def main(argv=None) -> int:
    """Run one `cvr` command; bad input gets one line on stderr and a non-zero exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ValueError, KeyError, FileNotFoundError, NotADirectoryError, PermissionError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"cvr: error: {message}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cvr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
