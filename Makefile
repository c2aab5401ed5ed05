# Two commands on a fresh machine:  make demo  (export the shipped model, sample from its engines)  and  make test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CKPT   := checkpoints/fmnist-pg-s.safetensors
TUNED  := checkpoints/fmnist-pg-s.recommended.json

.PHONY: install demo test bench clean

# torch first, pinned to the CPU build on local disk, so no dependency pulls a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,export,latent,openvino,serve,ray,bench,dev]'
	touch $(STAMP)

install: $(STAMP)

# The build attaches the sampling setting lego-export tune chose for the shipped model (see README,
# Performance); lego-run uses it when given no sampling option, on OpenVINO (auto) when installed.
demo: $(STAMP)
	$(BIN)/lego-export build --ckpt $(CKPT) --out engines --force --int8 --recommended $(TUNED)
	$(BIN)/lego-run --engines engines --num 80 --out demo/grid.png --timing-json demo/timing.json
	$(BIN)/lego-run --engines engines --num 80 --precision int8 --out demo/grid-int8.png
	$(BIN)/lego-run --engines engines --resolution 32x96 --num 20 --out demo/wide-32x96.png

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# Latency and quality benchmarks; needs make demo's engines/. The benchmarks write files only when
# given --out: here the committed results, under the names the docs link.
RESULTS := benchmarks/results
bench: $(STAMP)
	$(BIN)/python benchmarks/latency.py --out $(RESULTS)/latency
	$(BIN)/python benchmarks/quality.py --out $(RESULTS)/quality
	$(BIN)/python benchmarks/wide.py --out $(RESULTS)/wide
	$(BIN)/python benchmarks/peers.py --out $(RESULTS)/peers
	$(BIN)/python benchmarks/peers.py --batch 1 --out $(RESULTS)/peers-b1
	$(BIN)/python benchmarks/frontier.py --out $(RESULTS)/frontier-cache
	$(BIN)/python benchmarks/serve.py --out $(RESULTS)/serve

clean:
	rm -rf $(VENV) demo
