"""Recall measured on what users get: a split's captions searched through `Retriever.search`, the
path `cvr search` and `cvr serve` run (mode, candidates, filters, backend), and each caption's
video looked up among the hits (`cvr evaluate --gallery`).

Captions of videos the gallery does not hold are left out (and counted). A caption whose video is
not among its hits (outside the top-k, or dropped by a first stage or a
filter) counts as a miss at rank infinity: recall falls, MedR is reported as null when more than
half are missed, and its average precision is 0.
"""
from __future__ import annotations

import math

import numpy as np

from engine.datasets import video_id_of
from engine.errors import InputError


def search_metrics(retriever, captions: list, k: int | None = None, options=None, where=None,
                   batch_size: int = 64) -> dict:
    """t2v R@1/5/10, MedR, MnR (over the found), mAP and the fraction found, for (caption id,
    text) pairs; `k` hits per query (default: the whole gallery, so every rank is exact in
    exhaustive mode)."""
    gallery = retriever.gallery
    present = set(gallery.ids)
    wanted = [video_id_of(cap_id) for cap_id, _ in captions]
    if not captions:
        raise InputError("no captions to evaluate")
    missing = sorted({v for v in wanted if v not in present})
    if len(missing) == len(set(wanted)):
        raise InputError(f"{gallery.folder}: the gallery holds none of the split's videos (e.g. {missing[0]})")
    kept = [i for i, video_id in enumerate(wanted) if video_id in present]  # captions of absent videos: not counted
    captions, wanted = [captions[i] for i in kept], [wanted[i] for i in kept]
    k = min(k or len(gallery), len(gallery))
    ranks = np.full(len(captions), math.inf)
    texts = [text for _, text in captions]
    for start in range(0, len(texts), batch_size):
        results = retriever.search(texts[start : start + batch_size], k=k, options=options, where=where)
        for offset, result in enumerate(results):
            ids = [video_id for video_id, _ in result.hits]
            target = wanted[start + offset]
            if target in ids:
                ranks[start + offset] = ids.index(target) + 1
    return _summary(ranks, len(gallery), len(missing))


def _summary(ranks: np.ndarray, videos: int, missing_videos: int) -> dict:
    found = np.isfinite(ranks)
    median = float(np.median(ranks))
    return {
        "t2v_r1": float(100.0 * np.mean(ranks <= 1)), "t2v_r5": float(100.0 * np.mean(ranks <= 5)),
        "t2v_r10": float(100.0 * np.mean(ranks <= 10)),
        "t2v_medr": median if math.isfinite(median) else None,
        "t2v_mnr_found": float(np.mean(ranks[found])) if found.any() else None,
        "t2v_map": float(np.mean(np.where(found, 1.0 / np.where(found, ranks, 1.0), 0.0))),
        "found": float(np.mean(found)), "queries": int(len(ranks)), "videos": int(videos),
        "videos_not_in_gallery": int(missing_videos),
    }
