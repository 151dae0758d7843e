"""`cvr train` and `cvr evaluate`: the retrieval model (training/retrieval.py)."""
from __future__ import annotations

import os

from engine.cli.common import CLIError, add_overwrite
from engine.outputs import claim, claim_evaluation


def add(sub) -> None:
    train = sub.add_parser("train", help="train the retrieval model (text-only or with an anchor store)")
    train.add_argument("--root", required=True)
    train.add_argument("--collection", required=True)
    train.add_argument("--feature", default="resnet50", help="frame feature folder under FeatureData/")
    train.add_argument("--out", required=True, help="checkpoint folder to write")
    train.add_argument("--anchors", default="none",
                       help="'none' (text-only) or an anchor store folder written by `cvr anchors`")
    train.add_argument("--anchors-per-query", type=int, default=None, metavar="N",
                       help="read the first N of the store's anchors per caption jointly (default: all it holds); "
                            "the checkpoint records N and search draws as many")
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
    train.add_argument("--tag-max-df", type=float, default=1.0, metavar="F",
                       help="drop concept tags that more than this fraction of the training videos carry "
                            "(1: keep all, RIVRL's recipe)")
    train.add_argument("--max-frames", type=int, default=64)
    for name, default in (("latent-dim", 1024), ("attn-dim", 512), ("video-gru-hidden", 512),
                          ("video-local-dim", 1024)):
        train.add_argument(f"--{name}", type=int, default=default)
    train.add_argument("--attention", default="hybrid", choices=["hybrid", "spatial", "channel", "meanpool"])
    train.add_argument("--no-local-branch", action="store_true")
    train.add_argument("--no-concept-space", action="store_true")
    add_glscl_flags(train)
    train.add_argument("--weights-dtype", default="float32", choices=["float32", "float16"],
                       help="how model.safetensors stores the weights (float16: half the size; default float32)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    add_overwrite(train, "--out")
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser("evaluate", help="metrics of a checkpoint on one split (--gallery: through the "
                                               "search path users get)")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--root", default=None, help="data root (default with --gallery: the checkpoint's)")
    evaluate.add_argument("--collection", default=None, help="(default with --gallery: the checkpoint's)")
    evaluate.add_argument("--gallery", default=None,
                          help="search this gallery with the split's captions through the path `cvr search` and "
                               "`cvr serve` run (mode, candidates, filters, backend), and rank each caption's video")
    evaluate.add_argument("--mode", default="auto", choices=["auto", "exhaustive", "two-stage"],
                          help="--gallery: the search mode")
    evaluate.add_argument("--candidates", type=int, default=None, help="--gallery: two-stage candidates per query")
    evaluate.add_argument("--where", action="append", default=[], help="--gallery: metadata filters")
    evaluate.add_argument("--backend", default="torch", help="--gallery: the query backend")
    evaluate.add_argument("--rerank", default=None, metavar="RERANKER",
                          help="--gallery: rerank each query's top M with this reranker (`cvr train-reranker`)")
    evaluate.add_argument("-k", type=int, default=None,
                          help="--gallery: hits per query (default: the whole gallery, so ranks are exact)")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument("--anchors", default=None, help="anchor store (for a model trained with anchors)")
    evaluate.add_argument("--feature", default=None, help="default: the feature the checkpoint was trained on")
    evaluate.add_argument("--transductive", action="store_true",
                          help="RIVRL's min-max over the whole test matrix (parity only)")
    evaluate.add_argument("--out", default=None, help="write <out>.json and <out>.md (default: beside the checkpoint)")
    add_overwrite(evaluate, "<out>.json and <out>.md")
    evaluate.set_defaults(func=_cmd_evaluate)


def add_glscl_flags(train) -> None:
    """--head and the glscl head's own flags (ModelConfig.glscl_*; engine/glscl.py)."""
    from engine.config import GLSCL_MASKS, HEADS, ModelConfig

    defaults = ModelConfig()
    train.add_argument("--head", default="cvr", choices=list(HEADS),
                       help="scoring head: cvr (this engine's model, default) or glscl (the GLSCL peer, text-only)")
    glscl = train.add_argument_group("the glscl head (with --head glscl)")
    for name, kind, what in (("queries", int, "K shared learnable queries"),
                             ("decoder-layers", int, "layers of the shared query decoder"),
                             ("temporal-layers", int, "layers of the temporal transformer over frames"),
                             ("heads", int, "attention heads (must divide --latent-dim)"),
                             ("frames", int, "F frames per video (more are subsampled evenly); replaces --max-frames"),
                             ("tau", float, "temperature of the frame weights"),
                             ("lambda", float, "weight of the local score: S = S_g + lambda S_l"),
                             ("alpha", float, "weight of the intra-diversity loss"),
                             ("beta", float, "weight of the inter-consistency loss's diagonal term")):
        field = "glscl_" + name.replace("-", "_")
        glscl.add_argument(f"--glscl-{name}", type=kind, default=getattr(defaults, field), dest=field,
                           help=f"{what} (default {getattr(defaults, field)})")
    glscl.add_argument("--glscl-mask", default=defaults.glscl_mask, choices=list(GLSCL_MASKS),
                       help="frame mask of the global score: paper (after the softmax, no renormalisation, as "
                            "GLSCL's code) or renormalise (softmax over the valid frames)")


def _glscl_config(args) -> dict:
    if args.head != "glscl":
        return {}
    names = ("queries", "decoder_layers", "temporal_layers", "heads", "frames", "tau", "lambda", "alpha", "beta",
             "mask")
    return {"head": "glscl", **{f"glscl_{n}": getattr(args, f"glscl_{n}") for n in names}}


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
    if anchors is not None and args.head == "glscl":
        raise CLIError("--head glscl is text-only: drop --anchors")
    if anchors is not None and not os.path.isdir(anchors):
        raise CLIError(f"--anchors: no anchor store at {anchors}")
    if args.anchors_per_query is not None and (anchors is None or args.anchors_per_query < 1):
        raise CLIError("--anchors-per-query wants a positive N and an anchor store (--anchors STORE)")
    claim(args.out, "bare checkpoint", "cvr train", args.overwrite)  # its onnx/ and evaluations are kept
    model_config = ModelConfig(
        text=_text_config(args), latent_dim=args.latent_dim, attn_dim=args.attn_dim,
        video_gru_hidden=args.video_gru_hidden, video_local_dim=args.video_local_dim, attention=args.attention,
        local_branch=not args.no_local_branch, concept_space=not args.no_concept_space, **_glscl_config(args),
    )
    train_config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                               threads=args.threads)
    job = RetrievalJob(root=args.root, collection=args.collection, feature=args.feature, out=args.out,
                       anchors=anchors, anchors_per_query=args.anchors_per_query,
                       tag_vocab_size=args.tag_vocab_size, tag_max_df=args.tag_max_df, max_frames=args.max_frames,
                       progress=not args.quiet)
    result = train_retrieval(job, model_config, train_config, weights_dtype=args.weights_dtype)
    print(f"wrote {result['checkpoint']} (best validation criterion {result['best_criterion']:.1f})")
    return 0


def _cmd_evaluate(args) -> int:
    from engine.metrics import format_metrics_table
    from training.retrieval import evaluate_checkpoint

    if args.gallery:
        return _evaluate_gallery(args)
    if not (args.root and args.collection):
        raise CLIError("give --root and --collection (or --gallery to evaluate through the search path)")
    out = args.out or os.path.join(args.checkpoint, f"eval_{args.collection}_{args.split}")
    claim_evaluation(out, args.overwrite)
    result = evaluate_checkpoint(args.checkpoint, args.root, args.collection, args.split, anchors=args.anchors,
                                 feature=args.feature, transductive=args.transductive, out=out)
    print(f"{args.collection} {args.split}: {result['queries']} queries, {result['videos']} videos")
    print(format_metrics_table(result["metrics"]))
    print(f"wrote {out}.json and {out}.md")
    return 0


def _evaluate_gallery(args) -> int:
    """`cvr evaluate --gallery`: recall of what `cvr search` / `cvr serve` return."""
    from engine import paths
    from engine.checkpoint import read_checkpoint_config
    from engine.datasets import Collection
    from engine.retriever import EXPORTED, Retriever, check_backend
    from engine.search import SearchOptions
    from engine.search_eval import search_metrics

    check_backend(args.backend)
    if args.rerank:
        from engine.cli.search import check_rerank

        check_rerank(args)
    options = SearchOptions(mode=args.mode, candidates=args.candidates)
    options.validate()
    job = read_checkpoint_config(args.checkpoint).get("train", {}).get("job", {})
    root = args.root or (job.get("root") and paths.resolve(job["root"], args.checkpoint))
    collection = args.collection or job.get("collection")
    if not root or not collection:
        raise CLIError(f"{args.checkpoint} records no training collection: give --root and --collection")
    captions = Collection(root, collection).captions(args.split)
    export_dir = None
    if args.backend in EXPORTED:
        from engine.cli.search import _default_export

        args.export, args.generator = None, None
        export_dir = _default_export(args)
    if args.rerank and args.backend == "onnxruntime":
        from engine.cli.search import _default_rerank_export

        _default_rerank_export(args.rerank)
    retriever = Retriever(args.checkpoint, args.gallery, backend=args.backend, export_dir=export_dir,
                          reranker=args.rerank)
    metrics = search_metrics(retriever, captions, k=args.k, options=options, where=args.where or None)
    out = args.out or os.path.join(args.gallery.rstrip("/") + f"_eval_{args.split}")
    claim_evaluation(out, args.overwrite)
    from engine import files
    from engine.outputs import EVALUATION_FORMAT

    files.write_json(out + ".json", {"format": EVALUATION_FORMAT, "checkpoint": args.checkpoint,
                                      "gallery": args.gallery, "split": args.split, "collection": collection,
                                      "mode": args.mode, "where": args.where, "backend": args.backend,
                                      "rerank": args.rerank, "metrics": metrics})
    lines = ["| t2v R@1 | R@5 | R@10 | MedR | mAP | found |", "|---|---|---|---|---|---|",
             f"| {metrics['t2v_r1']:.1f} | {metrics['t2v_r5']:.1f} | {metrics['t2v_r10']:.1f} | "
             f"{metrics['t2v_medr'] if metrics['t2v_medr'] is not None else 'inf'} | {metrics['t2v_map']:.3f} | "
             f"{100 * metrics['found']:.1f}% |"]
    files.atomic_write(out + ".md", "\n".join(lines) + "\n")
    reranked = f", reranked by {args.rerank}" if args.rerank else ""
    print(f"{collection} {args.split} through the search path ({args.mode}, {args.backend}{reranked}): "
          f"{metrics['queries']} queries, {metrics['videos']} videos")
    print("\n".join(lines))
    print(f"wrote {out}.json and {out}.md")
    return 0
