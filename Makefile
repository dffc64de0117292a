# Every target that needs Python creates .venv first; nothing is installed system-wide
# except python3-venv on a bare Debian that lacks it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { apt-get update && apt-get install -y python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,gguf]'
	# test-only: silero-vad ships real ONNX models; its torch dependency is not needed for them
	$(BIN)/pip install -q --no-deps silero-vad
	touch $@

run: $(STAMP)
	$(BIN)/edged serve

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m bench

lint: $(STAMP)
	$(BIN)/ruff check edged tests bench
	$(BIN)/ruff format --check edged tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var build *.egg-info
