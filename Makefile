# Every target that needs Python creates .venv first; system-wide, only the Debian packages
# below (and python3-venv on a bare Debian that lacks it) are installed, when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Debian/Ubuntu packages the build and tests need: libsystemd's headers for systemd-python,
# systemd-analyze for the unit's tests
SYSTEM_PACKAGES := libsystemd-dev pkg-config gcc systemd

.PHONY: run test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { apt-get update && apt-get install -y python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	@if ! pkg-config --exists libsystemd 2>/dev/null || ! command -v systemd-analyze >/dev/null; then \
		apt-get update && apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES); fi
	$(BIN)/pip install -q -e '.[dev,gguf,systemd]'
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
