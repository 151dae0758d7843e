"""Opening an export folder as the Retriever's pipeline (the `onnxruntime` and `tensorrt` backends),
checked against the checkpoint it is meant to serve. Torch-free, like the backends themselves.
"""
from __future__ import annotations

import os


def open_exported(backend: str, checkpoint: str, export_dir: str | None, device: str = "cpu",
                  generator: str | None = None, steps: int | None = None, anchor_cache: str | None = None,
                  vision_weights: str | None = None, threads: int = 1):
    """An OnnxRuntimeBackend or TensorRTBackend over `export_dir`, refused with one line when the
    folder was exported from another checkpoint (or, when given, another generator or ResNet)."""
    from engine.backends.onnxruntime import ExportedModelError
    from engine.checkpoint import WEIGHTS, CheckpointError, checkpoint_id, read_checkpoint_config, warn_on_other_noise
    from engine.retriever import QueryError

    if not export_dir:
        raise QueryError(f"the {backend} backend runs an export folder: make one with `cvr export --checkpoint "
                         f"{checkpoint}` and pass it (--export DIR)")
    config = read_checkpoint_config(checkpoint)
    if not os.path.isfile(os.path.join(checkpoint, WEIGHTS)):
        raise CheckpointError(f"{checkpoint}: no {WEIGHTS}")
    meta = config.get("anchors") or {}
    warn_on_other_noise(checkpoint, config)
    steps = steps if steps is not None else meta.get("steps")
    seed = int(meta.get("seed", 0))
    try:
        if backend == "tensorrt":
            from engine.backends.tensorrt import TensorRTBackend

            pipeline = TensorRTBackend(export_dir, steps=steps, seed=seed, anchor_cache=anchor_cache)
        else:
            from engine.backends.onnxruntime import OnnxRuntimeBackend

            pipeline = OnnxRuntimeBackend(export_dir, device=device, threads=threads, steps=steps, seed=seed,
                                          anchor_cache=anchor_cache)
    except ExportedModelError as error:
        raise QueryError(str(error)) from None
    _check_export(pipeline, checkpoint, checkpoint_id(checkpoint), generator, vision_weights)
    wanted = int(meta.get("anchors_per_query", 1))
    if pipeline.anchors and pipeline.anchors_per_query != wanted:
        raise QueryError(f"{pipeline.folder}: exported for {pipeline.anchors_per_query} anchors per query, the "
                         f"checkpoint reads {wanted}: run `cvr export --checkpoint {checkpoint}` again")
    kind = meta.get("features", "pixels")
    if pipeline.anchors and pipeline.anchor_features != kind:
        raise QueryError(f"{pipeline.folder}: exported for {pipeline.anchor_features} anchor features, the "
                         f"checkpoint reads {kind}: run `cvr export --checkpoint {checkpoint}` again")
    pipeline.open_search_modules()
    return pipeline


def _check_export(pipeline, checkpoint: str, ckpt_id: str, generator: str | None, vision: str | None) -> None:
    """An export folder must come from this checkpoint (and generator, and vision weights)."""
    from engine.fingerprints import generator_id, vision_id
    from engine.retriever import QueryError

    manifest = pipeline.manifest
    if manifest["checkpoint"]["id"] != ckpt_id:
        raise QueryError(f"{pipeline.folder}: exported from checkpoint {manifest['checkpoint']['id'][:12]}, "
                         f"not {ckpt_id[:12]}: run `cvr export --checkpoint {checkpoint}` again")
    anchors = manifest.get("anchors")
    if anchors and generator and generator_id(generator) != anchors["generator"]["id"]:
        raise QueryError(f"{pipeline.folder}: exported with generator {anchors['generator']['id']}, not {generator}")
    if anchors and vision and anchors.get("vision") and vision_id(vision) != anchors["vision"]["id"]:
        raise QueryError(f"{pipeline.folder}: exported with other vision weights than {vision}")
