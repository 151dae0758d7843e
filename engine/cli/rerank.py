"""`cvr train-reranker`: the generative reranker (DiffusionRet's idea) on top of a frozen
checkpoint (training/rerank.py; its runtime is engine/rerank.py and engine/reranking.py)."""
from __future__ import annotations

from engine.cli.common import add_overwrite, positive


def add(sub) -> None:
    from engine.reranking import RerankConfig

    defaults = RerankConfig()
    train = sub.add_parser("train-reranker", help="train a generative reranker of a checkpoint's top-M candidates")
    train.add_argument("--base", required=True, help="the first-stage checkpoint (frozen), either head")
    train.add_argument("--root", required=True)
    train.add_argument("--collection", required=True)
    train.add_argument("--out", required=True, help="reranker folder to write")
    train.add_argument("--feature", default=None, help="frame feature folder (default: the base's)")
    train.add_argument("--anchors", default=None, help="anchor store (a base trained with anchors only)")
    train.add_argument("--candidates", type=positive("--candidates"), default=defaults.candidates, metavar="M",
                       help=f"first-stage candidates each query's reranking reads (default {defaults.candidates})")
    train.add_argument("--diffusion-steps", type=positive("--diffusion-steps"), default=defaults.diffusion_steps,
                       metavar="T", help=f"steps T of the cosine noise schedule (default {defaults.diffusion_steps})")
    train.add_argument("--sample-steps", type=positive("--sample-steps"), default=None,
                       help="DDIM steps at search and validation (default: T)")
    train.add_argument("--hidden", type=positive("--hidden"), default=defaults.hidden,
                       help=f"the denoiser's width (default {defaults.hidden})")
    train.add_argument("--negative", type=float, default=defaults.negative, choices=[0.0, -1.0],
                       help="target x0 of a negative: 0 (default, DiffusionRet's) or -1; the positive's is +1")
    train.add_argument("--temp", type=float, default=defaults.temp, help="fused score: softmax(temp * x0) (default 1)")
    train.add_argument("--weight", type=float, default=defaults.weight,
                       help="fused score: first-stage score + weight * softmax (default 1)")
    train.add_argument("--epochs", type=positive("--epochs"), default=10)
    train.add_argument("--batch-size", type=positive("--batch-size"), default=128)
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=positive("--threads"), default=1)
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    add_overwrite(train, "--out")
    train.set_defaults(func=_cmd_train_reranker)


def _cmd_train_reranker(args) -> int:
    from engine.outputs import claim
    from engine.reranking import RerankConfig
    from training.rerank import RerankJob, RerankTrainConfig, train_reranker

    config = RerankConfig(candidates=args.candidates, diffusion_steps=args.diffusion_steps,
                          sample_steps=args.sample_steps, hidden=args.hidden, latent_dim=1, temp=args.temp,
                          weight=args.weight, negative=args.negative, seed=args.seed).validate()
    train_config = RerankTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                     threads=args.threads)
    train_config.validate()
    claim(args.out, "reranker", "cvr train-reranker", args.overwrite)
    job = RerankJob(base=args.base, root=args.root, collection=args.collection, out=args.out, feature=args.feature,
                    anchors=args.anchors, progress=not args.quiet)
    result = train_reranker(job, config, train_config)
    best, first = result["best"], result["first_stage"]
    print(f"wrote {result['reranker']} (epoch {best['epoch']}: val t2v R@1/5/10 {best['r1']:.1f}/{best['r5']:.1f}/"
          f"{best['r10']:.1f} reranked, {first['r1']:.1f}/{first['r5']:.1f}/{first['r10']:.1f} first stage)")
    return 0
