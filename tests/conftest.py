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
