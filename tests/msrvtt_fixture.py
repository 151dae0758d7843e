"""A tiny collection in the exact MSR-VTT feature-release layout, shared by the tests."""
import os

import numpy as np

from engine import datasets


def write_msrvtt_fixture(root: str, n_videos: int = 12, frames: int = 3, dim: int = 4096, seed: int = 0) -> None:
    """A tiny collection laid out exactly as the MSR-VTT feature release (collection msrvtt10k,
    feature resnext101-resnet152, ids video7010..., captions `video7010#enc#k`, tags)."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "msrvtt10k")
    words = ["man", "woman", "dog", "car", "guitar", "cooking", "singing", "running", "red", "blue", "kitchen"]
    video_ids = [f"video{7010 + i}" for i in range(n_videos)]
    frame_ids, rows, video2frames, captions, tags = [], [], {}, {"train": [], "val": [], "test": []}, {}
    for i, video in enumerate(video_ids):
        topic = [words[i % len(words)], words[(3 * i + 1) % len(words)]]
        ids = [f"{video}_{f}" for f in range(frames)]
        video2frames[video] = ids
        frame_ids += ids
        rows.append(rng.normal(size=(frames, dim)).astype(np.float32) + i % 5)
        split = "train" if i < n_videos // 2 else ("val" if i < 3 * n_videos // 4 else "test")
        for k in range(4):
            captions[split].append((f"{video}#enc#{k}", f"a {topic[0]} and a {topic[1]} in video number {k}"))
        tags[video] = {topic[0]: 3, topic[1]: 1}
    datasets.write_bigfile(os.path.join(base, "FeatureData", "resnext101-resnet152"), frame_ids,
                           np.concatenate(rows), video2frames=video2frames)
    for split, pairs in captions.items():
        datasets.write_captions(os.path.join(base, "TextData", f"msrvtt10k{split}.caption.txt"), pairs)
    os.makedirs(os.path.join(base, "TextData", "tags", "video_label_th_1"))
    datasets.write_tags(os.path.join(base, "TextData", "tags", "video_label_th_1.txt"), tags)
    datasets.write_tag_vocab(os.path.join(base, "TextData", "tags", "video_label_th_1", "tag_vocab_512.json"), words)
