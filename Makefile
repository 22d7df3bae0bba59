# Every target here is what CI runs: `make test` in CI is `make test` on a laptop.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-slow test-lowest lint bench demo demo-scst clean

install: $(STAMP)

# torch comes first and pinned: on this kind of machine pip takes these two wheels from local disk.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# The model and decoding tests run a second time with every fast path off (plain PyTorch: med_train.fast unused).
test: install
	$(BIN)/python -m pytest -q
	MED_FAST=0 $(BIN)/python -m pytest -q tests/test_med.py tests/test_decode.py tests/test_model.py

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# The fast tests against the lowest versions pyproject.toml allows (constraints/lowest.txt), in their own venv.
LOWEST := .venv-lowest
test-lowest:
	test -x $(LOWEST)/bin/python || $(PY) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install -q -c constraints/lowest.txt -e ".[dev]"
	$(LOWEST)/bin/python -m pytest -q

lint: install
	$(BIN)/ruff check med_train tests

# med_train against transformers' BLIP on this machine (a few minutes on a 2-core CPU); README "Speed".
bench: install
	$(BIN)/med bench --json-out runs/bench.json

# The demo: write the shapes set, train the small captioner (~11 min on a 2-core CPU), score it, caption a few.
demo: install
	test -f data/shapes/val/metadata.jsonl || $(BIN)/med data shapes data/shapes --train 20000
	$(BIN)/med train configs/shapes.yaml
	$(BIN)/med eval --split test
	$(BIN)/med caption data/shapes/test/000000.png data/shapes/test/000001.png data/shapes/test/000002.png \
		data/shapes/test/000003.png

# Self-critical training continuing the demo's run (runs/latest: run `make demo` first), about 5 min on a 2-core
# CPU, then its score. A shapes set written before the training split had all phrasings is written again (the
# demo's own captions and images stay as they were).
demo-scst: install
	test -d runs/latest/best || (echo "no runs/latest/best: run make demo first" >&2; exit 1)
	head -1 data/shapes/train/metadata.jsonl | grep -q '"references"' || $(BIN)/med data shapes data/shapes --train 20000
	$(BIN)/med train configs/shapes_scst.yaml
	$(BIN)/med eval --split test

clean:
	rm -rf $(VENV) $(LOWEST) build *.egg-info .pytest_cache
