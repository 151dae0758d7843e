"""`cvr index`: embed a collection's videos into a gallery folder (engine/indexing.py)."""
from __future__ import annotations

from engine.cli.common import add_overwrite
from engine.gallery import DTYPES, FAISS_SHORTHANDS


def add(sub) -> None:
    index = sub.add_parser("index", help="embed a collection's videos into a gallery folder")
    index.add_argument("--checkpoint", required=True, help="checkpoint folder whose video tower embeds the videos")
    index.add_argument("--root", required=True, help="data root holding the collection")
    index.add_argument("--collection", required=True)
    index.add_argument("--split", default=None, choices=["train", "val", "test"],
                       help="only this split's videos (default: every video of the feature folder)")
    index.add_argument("--out", required=True, help="gallery folder to write (replaced atomically)")
    index.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                       help="stored precision (default: float16; when appending, the gallery's)")
    index.add_argument("--append", action="store_true",
                       help="add these videos to the existing gallery at --out (same checkpoint, no duplicate ids)")
    index.add_argument("--faiss", default=None, metavar="FACTORY",
                       help=f"first-stage index over the global latent vectors: {', '.join(FAISS_SHORTHANDS)} "
                            "(ivf = IVF<sqrt N>,SQfp16), any faiss index_factory string (e.g. IVF1024,SQfp16), or "
                            "none (default: none; when appending, the gallery's)")
    index.add_argument("--feature", default=None, help="frame feature folder (default: the checkpoint's)")
    index.add_argument("--batch-size", type=int, default=256)
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overwrite(index, "--out")
    index.set_defaults(func=handler)


def handler(args) -> int:
    """Build (or extend) a gallery and print one summary line."""
    from engine.indexing import build_gallery

    manifest = build_gallery(args.checkpoint, args.root, args.collection, split=args.split, out=args.out,
                             feature=args.feature, dtype=args.dtype, batch_size=args.batch_size,
                             append=args.append, progress=not args.quiet, faiss=args.faiss,
                             overwrite=args.overwrite)
    index = manifest["faiss"]
    described = "no FAISS index" if not index else f"FAISS {index['factory']}" + "".join(
        f", {k} {index[k]}" for k in ("nprobe", "efSearch") if k in index)
    print(f"wrote {args.out}: {manifest['count']} videos, D={manifest['dims']['latent']}, "
          f"K={manifest['dims']['concept']}, {manifest['dtype']}, {described}")
    return 0
