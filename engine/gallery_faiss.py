"""The gallery's FAISS first stage: factory strings, building, search parameters, manifest record, reading."""
from __future__ import annotations

import math
import os

import numpy as np

from engine.gallery_format import GalleryError

# FAISS index shorthands: `ivf` gets sqrt(N) lists with fp16 codes (ARCHITECTURE.md section 14; the
# latency benchmark's index), `hnsw` 32 links per node.
FAISS_SHORTHANDS = {"flat": "Flat", "ivf": "IVF{nlist},SQfp16", "hnsw": "HNSW32"}
DEFAULT_NPROBE = 16
DEFAULT_EF_SEARCH = 64
TRAIN_POINTS_PER_LIST = 40  # k-means sample: FAISS's own minimum per centroid, a few seconds at 1M


def faiss_factory(spec: str, n: int) -> str:
    """The faiss `index_factory` string for `spec` (a shorthand or a factory string) over n vectors:
    `ivf` becomes IVF<round(sqrt n)>,SQfp16 (at most n lists: k-means cannot make more)."""
    if not isinstance(spec, str) or not spec.strip():
        raise GalleryError("the FAISS index needs a shorthand (flat, ivf, hnsw) or an index_factory string")
    factory = FAISS_SHORTHANDS.get(spec, spec)
    return factory.format(nlist=max(1, min(n, round(math.sqrt(n)))))


def build_faiss_index(vectors, factory: str, seed: int = 0) -> tuple:
    """(index, training points) of a FAISS inner-product index over (N, D) vectors (any float
    dtype, e.g. a float16 memory map) built as the factory string says: trained (IVF k-means, PQ
    codebooks) on a seeded sample of TRAIN_POINTS_PER_LIST points per list and filled in chunks,
    so no float32 copy of the gallery is ever made. GalleryError for a factory string faiss does
    not understand."""
    import faiss

    n, dim = vectors.shape
    train_points = None
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise GalleryError(f"FAISS cannot build {factory!r}: {_faiss_message(error)}") from None
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.cp.min_points_per_centroid = 1  # small galleries: no warning for a small sample
        lists = ivf.nlist if ivf is not None else 256
        # Product quantisers train 256 centroids per sub-vector: FAISS asks 39 points per centroid.
        train_points = min(n, max(TRAIN_POINTS_PER_LIST * lists, 39 * 256 if "PQ" in factory else 0))
        rows = np.random.default_rng(seed).choice(n, train_points, replace=False)
        try:
            index.train(np.ascontiguousarray(vectors[np.sort(rows)], dtype=np.float32))
        except RuntimeError as error:
            raise GalleryError(f"FAISS cannot train {factory!r} on {n} vectors: {_faiss_message(error)}") from None
    try:
        for start in range(0, n, 16384):
            index.add(np.ascontiguousarray(vectors[start : start + 16384], dtype=np.float32))
    except RuntimeError as error:  # e.g. IDMap indexes, which need ids the gallery does not give
        raise GalleryError(f"FAISS cannot fill {factory!r}: {_faiss_message(error)}") from None
    return index, train_points


def _faiss_message(error: Exception) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def faiss_search_parameters(index, nprobe: int | None = None, ef_search: int | None = None,
                            allowed_rows: np.ndarray | None = None):
    """faiss SearchParameters for one search (thread-safe: the index itself is not changed), or
    None when the index takes none; `allowed_rows` restricts the search to those rows (an id
    selector). A parameter the index does not have is a GalleryError."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    hnsw = _hnsw_of(index)
    if nprobe is not None and ivf is None:
        raise GalleryError("--nprobe is a parameter of IVF indexes; this gallery's index has no inverted lists")
    if ef_search is not None and hnsw is None:
        raise GalleryError("--ef-search is a parameter of HNSW indexes; this gallery's index is no HNSW")
    for name, value in (("nprobe", nprobe), ("ef-search", ef_search)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise GalleryError(f"--{name} must be a positive integer, got {value!r}")
    params = None
    if ivf is not None:
        params = faiss.SearchParametersIVF(nprobe=min(ivf.nlist, nprobe or ivf.nprobe))
    elif hnsw is not None:
        params = faiss.SearchParametersHNSW(efSearch=ef_search or hnsw.hnsw.efSearch)
    if allowed_rows is not None:
        params = params if params is not None else faiss.SearchParameters()
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_rows, dtype=np.int64))
        params.sel = selector
        params.selector_rows = selector  # faiss does not own it: it lives as long as the parameters
    refine = faiss.downcast_index(index)
    if params is not None and isinstance(refine, faiss.IndexRefine):  # `...,RFlat` / `Refine(...)`
        params = faiss.IndexRefineSearchParameters(k_factor=refine.k_factor, base_index_params=params)
    return params


def _hnsw_of(index):
    """The HNSW index of `index` (itself, or the base of a refining index), or None."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        index = faiss.downcast_index(index.base_index)
    return index if isinstance(index, faiss.IndexHNSW) else None


def _apply_defaults(index, params: dict) -> None:
    """The manifest's default search parameters (faiss.write_index does not keep them all)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and params.get("nprobe"):
        ivf.nprobe = int(params["nprobe"])
    hnsw = _hnsw_of(index)
    if hnsw is not None and params.get("efSearch"):
        hnsw.hnsw.efSearch = int(params["efSearch"])


def faiss_record(index, spec: str, factory: str, train_points: int | None) -> dict:
    """The manifest's description of a FAISS index: factory string (and the shorthand it came
    from, resolved again for a new size when the gallery grows), metric, vectors, defaults."""
    import faiss

    record = {"factory": factory, "metric": "inner_product", "vectors": "lat[:, 0]", "train_points": train_points}
    if spec in FAISS_SHORTHANDS:
        record["shorthand"] = spec
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        record.update(nlist=int(ivf.nlist), nprobe=min(int(ivf.nlist), DEFAULT_NPROBE))
    if _hnsw_of(index) is not None:
        record.update(efSearch=DEFAULT_EF_SEARCH)
    return record


def _read_faiss(folder: str, manifest: dict):
    import faiss

    path = os.path.join(folder, manifest["faiss"]["file"])
    try:
        index = faiss.read_index(path)
    except RuntimeError as error:
        raise GalleryError(f"{path}: unreadable FAISS index ({_faiss_message(error)})") from None
    if index.ntotal != manifest["count"] or index.d != manifest["dims"]["latent"]:
        raise GalleryError(f"{path}: index holds {index.ntotal} vectors of width {index.d}, the manifest says "
                           f"{manifest['count']} of width {manifest['dims']['latent']}")
    _apply_defaults(index, manifest["faiss"])
    return index
