"""The anchor store (``cvr anchors``): one anchor per caption (fair query protocol) or per video
(SSSS protocol), kept as its ResNet-50 region grid.

A BigFile (engine/bigfile.py) with one row of R*2048 floats per id, plus ``anchor_meta.json``:
format, regions, width, image sizes, generator and adapter ids, steps, seed, the noise scheme the
anchors were drawn with, and the caller's fields (protocol, collection, split, generator, vision
weights). Written atomically in one folder; read back with :func:`read_anchor_store`, which refuses
a store drawn with another noise scheme.

Several anchors per caption (``cvr anchors --anchors-per-query N``, issue 17 item 3): anchor j of a
prompt is drawn with seed ``seed + j`` (``portable.prompt_seed(prompt, seed + j)``), so anchor 0 is
the one-anchor store's; a row then holds the N grids one after another (N*R*2048 floats), which
is the (N*R, 2048) region axis the query tower reads, and the metadata records
``"anchors_per_query": N`` (absent: 1, so one-anchor stores are written as before).

Anchor features without the pixels (``cvr anchors --features latent``, issue 17 item 4, "anchor
from generator features"): a row then holds the generator's final packed latent tokens, (L, C)
per anchor (the built-in student's 64 tokens of 48 channels), instead of the ResNet-50's (R, 2048)
grid; no image is decoded and no ResNet runs. The metadata records ``"features": "latent"`` with
regions = L and dim = C (absent: "pixels", so pixel stores are written as before), and a
checkpoint trained on such a store reads latents at search time too.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine import files, paths
from engine.anchors import AnchorError, AnchorGenerator
from engine.integrity import SEAL, check_seal, seal, verify_files
from engine.portable import NOISE_SCHEME

META_FILE = "anchor_meta.json"
STORE_FORMAT = "cvr-sdgm/anchors/1"
DRAW_AGAIN = "draw the store again with `cvr anchors`"
PIXELS, LATENT = "pixels", "latent"  # what a store's regions are (meta "features"; absent: pixels)
FEATURES = (PIXELS, LATENT)


def anchors_per_query(meta: dict) -> int:
    """How many anchors per id a store (or a checkpoint's anchors section) holds: 1 when unsaid."""
    count = meta.get("anchors_per_query", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise AnchorError(f"anchors_per_query must be a positive integer, got {count!r}")
    return count


def anchor_features(meta: dict) -> str:
    """What a store's (or a checkpoint's anchors section's) regions are: "pixels" (ResNet-50
    grids of decoded anchors, the default when unsaid) or "latent" (the generator's final latent)."""
    kind = meta.get("features", PIXELS)
    if kind not in FEATURES:
        raise AnchorError(f"unknown anchor features {kind!r}: {' or '.join(FEATURES)}")
    return kind


def check_same_features(store_meta: dict, checkpoint_meta: dict, store: str) -> None:
    """Refuse (one line) a store whose regions are not the kind a checkpoint was trained on."""
    have, want = anchor_features(store_meta), anchor_features(checkpoint_meta)
    if have != want:
        raise AnchorError(f"{store}: holds {have} anchor features, the checkpoint was trained on {want} ones: draw a "
                          f"store with `cvr anchors --features {want}`")


def latent_shape(generator: AnchorGenerator) -> tuple:
    """(L, C) of a built-in generator's packed latent: its tokens and their channels."""
    if generator.kind != "builtin":
        raise AnchorError("--features latent needs a built-in generator")
    config = generator.backend.config
    return config.image_tokens, config.in_channels


def write_anchor_store(folder, generator: AnchorGenerator, extractor, ids: Sequence[str], prompts: Sequence[str],
                       meta: dict, steps: int | None = None, seed: int = 0, batch_size: int = 32,
                       png_dir=None, progress: bool = True, anchors: int = 1, features: str = PIXELS) -> Path:
    """Generate `anchors` anchors per (id, prompt) (seeds seed..seed+anchors-1), run the ResNet-50
    and write the flattened region grids as a BigFile (one row of anchors*R*2048 floats per id)
    plus anchor_meta.json. Streams in batches. With features="latent" the rows are the
    generator's final latent tokens instead (anchors*L*C floats; `extractor` unused, may be None)."""
    from tqdm import tqdm

    from engine.datasets import BigFileWriter

    if len(ids) != len(prompts):
        raise AnchorError(f"{len(ids)} ids but {len(prompts)} prompts")
    if not ids:
        raise AnchorError("nothing to generate: no ids")
    if anchors < 1:
        raise AnchorError(f"anchors per query must be at least 1, got {anchors}")
    anchor_features({"features": features})
    if features == LATENT:
        if png_dir:
            raise AnchorError("--png draws decoded anchors: a latent store decodes none")
        return _write_latent_store(Path(folder), generator, ids, prompts, meta, steps, seed, batch_size, progress,
                                   anchors)
    r = extractor.grid_size() ** 2
    dim = extractor.feature_dim
    folder = Path(folder)
    if png_dir:
        from engine.outputs import mark_anchor_pngs

        mark_anchor_pngs(png_dir)  # so that a later `cvr anchors --png` may write into it again
    with BigFileWriter(folder, anchors * r * dim) as writer:
        for start in tqdm(range(0, len(ids), batch_size), desc="anchor store", unit="batch", disable=not progress):
            batch_ids = list(ids[start:start + batch_size])
            grids = []
            for j in range(anchors):
                images = generator.generate(prompts[start:start + batch_size], steps=steps, seed=seed + j)
                grids.append(extractor.regions(images).reshape(len(batch_ids), -1).numpy())
                if png_dir:
                    _write_pngs(png_dir, batch_ids, images, j)
            writer.add(batch_ids, np.concatenate(grids, axis=1))  # anchor j's grid at [j*R*dim, (j+1)*R*dim)
        full = {"format": STORE_FORMAT, "regions": r, "dim": dim, "image_size": extractor.config.image_size,
                "anchor_size": generator.image_size, "generator_id": generator.generator_id,
                "adapter_id": generator.adapter_id, "steps": steps or generator.default_steps, "seed": seed,
                "noise": NOISE_SCHEME, **meta}
        if anchors > 1:  # absent for one anchor: such a store's metadata stays what it always was
            full["anchors_per_query"] = anchors
        writer.add_file(META_FILE, _sealed_meta(full))
    return folder


def _write_latent_store(folder: Path, generator: AnchorGenerator, ids, prompts, meta: dict, steps, seed: int,
                        batch_size: int, progress: bool, anchors: int) -> Path:
    """write_anchor_store's features="latent" branch: the same layout (anchor j of a row at
    [j*L*C, (j+1)*L*C)), the generator's latent tokens in place of ResNet grids."""
    from tqdm import tqdm

    from engine.datasets import BigFileWriter

    tokens, channels = latent_shape(generator)
    with BigFileWriter(folder, anchors * tokens * channels) as writer:
        for start in tqdm(range(0, len(ids), batch_size), desc="anchor store", unit="batch", disable=not progress):
            batch = list(prompts[start:start + batch_size])
            grids = [generator.generate_latents(batch, steps=steps, seed=seed + j).reshape(len(batch), -1)
                     for j in range(anchors)]
            writer.add(list(ids[start:start + batch_size]), np.concatenate(grids, axis=1))
        full = {"format": STORE_FORMAT, "features": LATENT, "regions": tokens, "dim": channels,
                "anchor_size": generator.image_size, "generator_id": generator.generator_id,
                "adapter_id": generator.adapter_id, "steps": steps or generator.default_steps, "seed": seed,
                "noise": NOISE_SCHEME, **meta}
        if anchors > 1:
            full["anchors_per_query"] = anchors
        writer.add_file(META_FILE, _sealed_meta(full))
    return folder


def _write_pngs(png_dir, ids: list, images, anchor: int) -> None:
    """Anchor 0 as <id>.png (the one-anchor store's names), anchor j > 0 as <id>_a<j>.png."""
    from PIL import Image

    suffix = f"_a{anchor}" if anchor else ""
    for i, img in zip(ids, images, strict=True):
        with files.atomic_path(Path(png_dir) / f"{i.replace('#', '_')}{suffix}.png") as temporary:
            Image.fromarray(img).save(temporary)


def _sealed_meta(meta: dict):
    """anchor_meta.json's text from the store's files' digests (BigFileWriter.add_file), sealed."""
    settings = {k: v for k, v in meta.items() if k not in ("files", SEAL)}
    return lambda digests: files.to_json(seal({**settings, "files": digests}))


def merge_anchor_stores(parts: Sequence, folder) -> Path:
    """Concatenate anchor stores drawn in parallel (`cvr anchors --workers N`: one contiguous shard
    of the ids each, same generator and settings) into one store, in the order given."""
    from engine.datasets import BigFileWriter

    first = read_anchor_store(parts[0])
    row_floats = anchors_per_query(first[2]) * int(first[2]["regions"]) * int(first[2]["dim"])
    with BigFileWriter(Path(folder), row_floats) as writer:
        for part in parts:
            ids, regions, meta = read_anchor_store(part)
            if _settings(_rebased(meta, part, folder)) != _settings(_rebased(first[2], parts[0], folder)):
                raise AnchorError(f"{part}: drawn with other settings than {parts[0]}; cannot merge")
            for start in range(0, len(ids), 1024):
                chunk = np.asarray(regions[start : start + 1024]).reshape(-1, row_floats)
                writer.add(ids[start : start + 1024], chunk)
        writer.add_file(META_FILE, _sealed_meta(_rebased(first[2], parts[0], folder)))
    return Path(folder)


def _settings(meta: dict) -> dict:
    """What a store was drawn with: its metadata less the digests of its own files."""
    return {k: v for k, v in meta.items() if k not in ("files", SEAL)}


def _rebased(meta: dict, part, folder) -> dict:
    """A store's metadata with its generator reference (relative to the store) moved to `folder`."""
    moved = {name: paths.rebase(meta[name], part, folder) for name in ("generator", "vision_weights")
             if meta.get(name) and meta[name] not in ("builtin", "random")}
    return dict(meta, **moved)


def read_anchor_store(folder):
    """(ids, regions (n, A*R, 2048) float32 memmap view, meta) of an anchor store of A anchors per
    id (meta "anchors_per_query", 1 when absent): anchor j's grid is regions[:, j*R:(j+1)*R]."""
    from engine.datasets import FEATURE_DTYPE, FEATURE_FILE, BigFile

    folder = Path(folder)
    files.recover(folder)  # a writer killed mid-swap may have left it aside
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise AnchorError(f"{folder} is not an anchor store (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AnchorError(f"{meta_path}: unreadable ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
        raise AnchorError(f"{meta_path}: not an anchor store's metadata")
    check_seal(meta, str(meta_path), DRAW_AGAIN, AnchorError)  # stores drawn before seals load as before
    if not isinstance(meta.get("files", {}), dict):
        raise AnchorError(f"{meta_path}: invalid field 'files'")
    verify_files(str(folder), meta.get("files", {}), DRAW_AGAIN, AnchorError)
    if meta.get("noise") != NOISE_SCHEME:
        raise AnchorError(f"{folder}: anchors drawn with noise {meta.get('noise')!r}, this engine draws "
                          f"{NOISE_SCHEME!r}: {DRAW_AGAIN}")
    big = BigFile(folder)
    n, dim = big.shape
    anchor_features(meta)  # a kind this engine does not know is refused here, not at training
    r, d, count = int(meta["regions"]), int(meta["dim"]), anchors_per_query(meta)
    if count * r * d != dim:
        raise AnchorError(f"{folder}: rows have {dim} floats, but the meta says {count} anchors x {r} regions x {d}")
    regions = np.memmap(folder / FEATURE_FILE, dtype=FEATURE_DTYPE, mode="r", shape=(n, count * r, d))
    return list(big.ids), regions, meta
