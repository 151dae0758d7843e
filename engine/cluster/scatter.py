"""Exact scatter-gather search over a shard set (engine/cluster/shardset.py).

A query batch is encoded once (text, anchor, ResNet-50 regions, query tower: the Retriever's own
path); its embeddings go to every shard; each shard ranks its own rows with the one gallery search
(engine/search.py) and returns its top-k with global rows (its offset + its row); the merge keeps
the global top-k under the project's tie rule, the lower global row first. Since every shard's rows
follow the previous shard's, ranking the concatenated answers shard by shard with the stable top-k
is exactly that rule: in exhaustive mode the result equals the unsharded search (same ids, same
order), filters included (each shard applies them to its own rows). In two stages each shard's
FAISS index proposes its own M candidates.

Shards are reached through a *fan-out*: `LocalShards` (ShardSearcher objects in this process: the
tests and the benchmark's single-process rows) or engine/cluster/ray_shards.RayShards (one Ray
actor per shard). Both answer `call(method, *args)` with one result per shard, in shard order.
"""
from __future__ import annotations

import os

import numpy as np

from engine.cluster.shardset import ShardSetError, load_shard, read_shardset
from engine.portable import topk_stable
from engine.retriever import QueryError, Retriever, SearchResult, Timings, check_scores, hit_details
from engine.search import SearchOptions
from engine.search import search as gallery_search

LOOKUPS_KEPT = 4096  # video lookups (the video routes of a server) remembered per process


class ShardSearcher:
    """One shard: its gallery and the checkpoint's scorer (what a Ray actor holds)."""

    def __init__(self, folder: str, entry: dict, checkpoint: str, fields: list, device: str = "cpu",
                 threads: int = 1, verify: bool = True):
        import torch

        from engine.backends.pytorch import scorer_for
        from engine.checkpoint import load_matcher
        from engine.search import keep_freed_memory

        torch.set_num_threads(max(1, int(threads)))
        matcher = load_matcher(checkpoint, device)
        self.gallery = load_shard(folder, entry, matcher.checkpoint_id, verify)
        self.scorer = scorer_for(matcher, device)  # the checkpoint's head: cvr or glscl
        self.offset, self.name, self.fields = int(entry["offset"]), entry["name"], list(fields)
        self._table = None
        keep_freed_memory()

    def info(self) -> dict:
        gallery = self.gallery
        return {"name": self.name, "offset": self.offset, "count": len(gallery),
                "indexed": gallery.faiss_index is not None, "media_root": gallery.media_root,
                "nbytes": gallery.nbytes, "pid": os.getpid()}

    def _allowed(self, where: list):
        from engine import filters

        conditions = filters.parse_all(where)
        if not conditions:
            return None
        if self._table is None:
            table = self.gallery.fields()
            for name in self.fields:  # a field of the set that no video of this shard has: all None
                table.setdefault(name, [None] * len(self.gallery))
            self._table = table
        return filters.allowed_rows(self._table, len(self.gallery), conditions)

    def search(self, q_lat: np.ndarray, q_con: np.ndarray, k: int, options: dict, where: list) -> dict:
        """This shard's top-k of every query: values and global rows (Q, k'), and per query the
        hits' ids and details (path, segment, thumbnail)."""
        gallery = self.gallery
        options = SearchOptions(**options)
        values, rows = gallery_search(self.scorer, gallery, q_lat, q_con, min(int(k), len(gallery)), options,
                                      self._allowed(where))
        check_scores(values[rows >= 0], gallery.folder)
        ids, details = [], []
        for query, row in zip(q_lat, rows, strict=True):
            kept = row[row >= 0]
            segments = gallery.best_segments(kept, query[0])
            ids.append([gallery.ids[j] for j in kept.tolist()])
            details.append([hit_details(gallery, j, s) for j, s in zip(kept.tolist(), segments, strict=True)])
        return {"values": values, "rows": np.where(rows >= 0, rows + self.offset, -1), "ids": ids, "details": details}

    def lookup(self, video_id: str) -> dict | None:
        """A video of this shard: its global row, record, paths, thumbnail and metadata; None if
        the video is in another shard."""
        gallery = self.gallery
        row = gallery.row_of(video_id)
        if row is None:
            return None
        return {"row": row + self.offset, "record": gallery.record(row), "paths": gallery.paths(video_id),
                "thumbnail": gallery.thumbnail(row), "metadata": gallery.metadata_of(video_id)}


class LocalShards:
    """Every shard of a set in this process."""

    def __init__(self, searchers: list):
        self.searchers = searchers

    @classmethod
    def open(cls, folder: str, checkpoint: str, device: str = "cpu", threads: int = 1) -> LocalShards:
        top = read_shardset(folder)
        return cls([ShardSearcher(folder, entry, checkpoint, top["fields"], device, threads)
                    for entry in top["shards"]])

    def call(self, method: str, *args) -> list:
        return [getattr(searcher, method)(*args) for searcher in self.searchers]

    def close(self) -> None:
        self.searchers = []


def merge(answers: list, k: int) -> tuple:
    """The global top-k of the shards' answers: (values (Q, k), global rows (Q, k), and per query
    the (shard, position) of each kept hit). Columns run shard by shard, each shard's in its own
    order, so a tie goes to the lower column, which is the lower global row."""
    values = np.concatenate([a["values"] for a in answers], axis=1)
    rows = np.concatenate([a["rows"] for a in answers], axis=1)
    owner = np.concatenate([np.full(a["rows"].shape, s) for s, a in enumerate(answers)], axis=1)
    position = np.concatenate([np.broadcast_to(np.arange(a["rows"].shape[1]), a["rows"].shape)
                               for a in answers], axis=1)
    ranked = np.where(rows >= 0, values, -np.inf)
    top, order = topk_stable(ranked, k)
    picked = np.take_along_axis(rows, order, axis=1)
    top = np.where(picked >= 0, top, -np.inf).astype(np.float32)
    where = [list(zip(np.take_along_axis(owner, order, axis=1)[i][picked[i] >= 0].tolist(),
                      np.take_along_axis(position, order, axis=1)[i][picked[i] >= 0].tolist(), strict=True))
             for i in range(len(rows))]
    return top, picked, where


class ShardedGallery:
    """What a server and the Retriever's checks ask of a gallery, over a shard set: its size, the
    set's folder, whether it has media and FAISS indexes, and each video's record, paths and
    thumbnail (asked of the shard that holds it)."""

    def __init__(self, folder: str, top: dict, shards, infos: list):
        self.folder, self.manifest, self.shards, self.infos = folder, top, shards, infos
        self.checkpoint_id = top["checkpoint"]["id"]
        # Not an index: a marker that every shard has one (SearchOptions.resolved_mode asks).
        self.faiss_index = "per shard" if all(info["indexed"] for info in infos) else None
        self.media_root = infos[0]["media_root"] if top.get("media") else None
        self._by_id, self._by_row = {}, {}

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def __repr__(self) -> str:
        return f"ShardedGallery({self.folder!r}, n={len(self)}, shards={len(self.infos)})"

    @property
    def has_media(self) -> bool:
        return self.media_root is not None

    @property
    def nbytes(self) -> int:
        return int(sum(info["nbytes"] for info in self.infos))

    def row_of(self, video_id: str) -> int | None:
        found = self._lookup(video_id)
        return None if found is None else found["row"]

    def _lookup(self, video_id: str) -> dict | None:
        if video_id not in self._by_id:
            found = next((a for a in self.shards.call("lookup", video_id) if a is not None), None)
            if len(self._by_id) >= LOOKUPS_KEPT:
                self._by_id, self._by_row = {}, {}
            self._by_id[video_id] = found
            if found is not None:
                self._by_row[found["row"]] = found
        return self._by_id[video_id]

    def _row(self, row: int) -> dict:
        found = self._by_row.get(row)
        if found is None:
            raise QueryError(f"row {row} of {self.folder} was not looked up by id first")
        return found

    def record(self, row: int) -> dict | None:
        return self._row(row)["record"]

    def thumbnail(self, row: int) -> str | None:
        return self._row(row)["thumbnail"]

    def paths(self, video_id: str) -> list:
        found = self._lookup(video_id)
        return [] if found is None else found["paths"]

    def metadata_of(self, video_id: str) -> dict:
        found = self._lookup(video_id)
        return {} if found is None else found["metadata"]


class ShardedRetriever(Retriever):
    """A Retriever whose gallery is a shard set: `search(texts, k, options, where)` as the
    Retriever's, ranked by scatter-gather over `shards` (a fan-out, see the module docstring)."""

    def __init__(self, pipeline, folder: str, shards, backend: str, anchor_cache: str | None = None):
        top = read_shardset(folder)
        if top["checkpoint"]["id"] != pipeline.checkpoint_id:
            raise QueryError(f"{folder}: shard set built with checkpoint {top['checkpoint']['id'][:12]}, not "
                             f"{pipeline.checkpoint_id[:12]}")
        infos = shards.call("info")
        if len(infos) != len(top["shards"]) or [i["name"] for i in infos] != [e["name"] for e in top["shards"]]:
            raise ShardSetError(f"{folder}: the shards reached are not the set's {len(top['shards'])} shards")
        self.backend, self.pipeline, self.anchor_cache, self.shards = backend, pipeline, anchor_cache, shards
        self.gallery = ShardedGallery(os.path.abspath(folder), top, shards, infos)
        self.last_timings, self._searched, self._fields = Timings(), False, None

    def allowed(self, where) -> list | None:
        """The filters, checked (syntax and field names); each shard applies them to its rows."""
        from engine import filters

        conditions = filters.parse_all(where)
        if not conditions:
            return None
        known = self.gallery.manifest["fields"]
        for condition in conditions:
            if condition.field not in known:
                names = ", ".join(known) if known else "none (no video files and no --metadata were indexed)"
                raise filters.FilterError(f"unknown filter field {condition.field!r}: "
                                          f"this gallery's fields are {names}")
        return list(where) if not isinstance(where, str) else [where]

    def _rank(self, texts: list, q_lat: np.ndarray, q_con: np.ndarray, k: int, options: SearchOptions,
              allowed, anchor_paths: list) -> list:
        mode = options.resolved_mode(self.gallery)
        shard_options = {"mode": mode, "candidates": options.candidates, "nprobe": options.nprobe,
                         "ef_search": options.ef_search}
        answers = self.shards.call("search", q_lat, q_con, k, shard_options, allowed or [])
        _, _, where = merge(answers, k)
        results = []
        for i, text in enumerate(texts):
            hits = [(answers[s]["ids"][i][j], float(answers[s]["values"][i][j])) for s, j in where[i]]
            details = [answers[s]["details"][i][j] for s, j in where[i]]
            results.append(SearchResult(text, hits, anchor=anchor_paths[i], details=details))
        return results
