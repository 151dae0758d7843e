"""The dependencies point one way: kernels <- engine <- export, training, bench. Every import of every
source module is read (module level and inside functions alike); only the command line
(engine/cli/) may reach up into training/ and export/. And the torch-free modules stay torch-free."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "kernels", "export", "training", "bench")
# package -> the project packages it must never import
FORBIDDEN = {
    "kernels": {"engine", "export", "training", "bench"},
    "engine": {"export", "training", "bench"},
    "export": {"training", "bench"},
    "training": {"export", "bench"},
}
CLI = ROOT / "engine" / "cli"
CLI_MAY = {"export", "training"}
# What the ONNX Runtime path imports: numpy, onnxruntime, tokenizers, safetensors, faiss, the
# standard library and these modules, never torch.
TORCH_FREE = ("engine/files.py", "engine/locks.py", "engine/integrity.py", "engine/errors.py", "engine/paths.py",
              "engine/portable.py", "engine/fingerprints.py", "engine/gallery.py", "engine/search.py",
              "engine/retriever.py", "engine/config.py", "engine/checkpoint.py", "engine/backends/onnxruntime.py",
              "engine/backends/exported.py", "engine/cli/__init__.py", "engine/cli/search.py",
              "engine/video.py", "engine/video_files.py", "engine/reranking.py", "engine/gallery_format.py",
              "engine/gallery_faiss.py", "engine/video_sampling.py", "engine/video_encode.py",
              "engine/backends/onnx_rerank.py")


def imports(path: Path) -> set:
    """Top-level module names of every import statement in a file (relative imports excluded)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def sources(package: str) -> list:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_import(package):
    wrong = []
    for path in sources(package):
        allowed = CLI_MAY if CLI in path.parents else set()
        bad = (imports(path) & FORBIDDEN[package]) - allowed
        wrong += [f"{path.relative_to(ROOT)} imports {name}" for name in sorted(bad)]
    assert not wrong, "; ".join(wrong)


def test_the_check_sees_lazy_imports(tmp_path):
    """An import inside a function counts as much as one at the top (the check must be able to fail)."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from training.retrieval import x\n    import export.onnx\n")
    assert imports(module) == {"training", "export"}


@pytest.mark.parametrize("name", TORCH_FREE)
def test_torch_free_modules_import_no_torch(name):
    assert "torch" not in imports(ROOT / name), f"{name} imports torch"
