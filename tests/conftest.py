"""Shared test set-up.

Triton reads TRITON_INTERPRET when its kernels are first decorated, so it must be set before any
kernel module is imported: here, before test collection. On a machine with CUDA, set
CVR_TRITON_GPU=1 to run the kernel tests on the GPU instead of the interpreter.
"""
import os

if not os.environ.get("CVR_TRITON_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Nothing may reach a model hub: every model loads from local folders or shipped packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# One thread: two threads on a busy 2-core machine are far noisier and no faster for tiny tensors.
torch.set_num_threads(1)


import pytest  # noqa: E402
from msrvtt_fixture import write_msrvtt_fixture  # noqa: E402


@pytest.fixture(scope="session")
def msrvtt(tmp_path_factory):
    """Root folder of a tiny collection `msrvtt10k` in the exact MSR-VTT layout (read-only)."""
    root = str(tmp_path_factory.mktemp("msrvtt"))
    write_msrvtt_fixture(root)
    return root


TINY_TRAIN = ["--epochs", "1", "--batch-size", "16", "--latent-dim", "32", "--attn-dim", "16", "--video-gru-hidden",
              "16", "--video-local-dim", "32", "--quiet"]


@pytest.fixture(scope="session")
def tiny_ckpt(msrvtt, tmp_path_factory):
    """A text-only checkpoint of tiny widths trained one epoch on `msrvtt` (read-only)."""
    from engine.cli import main

    out = str(tmp_path_factory.mktemp("tiny_ckpt") / "model")
    argv = ["train", "--root", msrvtt, "--collection", "msrvtt10k", "--feature", "resnext101-resnet152", "--out", out]
    assert main(argv + TINY_TRAIN) == 0
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    from engine.checkpoint import load_checkpoint

    return load_checkpoint(tiny_ckpt)
