#!/usr/bin/env bash
# Install edged on a device as a systemd service: NVIDIA Jetson (JetPack 5 or 6), any other
# aarch64 Linux, or x86-64. Run as root from a source tree (`make install` does):
#
#   1. a Python virtual environment at /opt/edged holding edged and its dependencies, with
#      version ranges suited to the platform's Python; on a Jetson the JetPack onnxruntime-gpu
#      wheel (TensorRT and CUDA providers) in place of PyPI's CPU onnxruntime;
#   2. the files of systemd/ where systemd/README.md says, and the symlinks
#      /usr/local/bin/edged and /usr/local/bin/edgectl;
#   3. systemd-sysusers, systemd-tmpfiles and `systemctl daemon-reload` where systemd runs;
#      the service is enabled and started only with --enable.
#
# Nothing is downloaded from anywhere but the package index pip is configured for; a JetPack
# onnxruntime-gpu wheel is given by the operator (arm64/README.md says where to get one).
# Run it again to upgrade: the venv is updated in place, /etc/edged/edged.toml is kept.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: arm64/install.sh [OPTIONS]      (as root; DESTDIR=DIR stages the install instead)

  --ort-wheel FILE     onnxruntime-gpu wheel to install instead of PyPI's onnxruntime
                       (env ORT_WHEEL), e.g. a JetPack 6 onnxruntime_gpu-*-cp310-*.whl
  --ort-index-url URL  pip index to take onnxruntime-gpu from (env ORT_INDEX_URL)
  --python PATH        the Python for the venv, 3.10 or later (env PYTHON)
  --no-gguf            leave out GGUF support (llama-cpp-python, compiled from source:
                       minutes on a PC, far longer on a Jetson with CUDA) (env EDGED_GGUF=0)
  --no-systemd-extra   leave out systemd-python (journal fields; needs libsystemd-dev and a
                       C compiler) (env EDGED_SYSTEMD_EXTRA=0)
  --constraints FILE   more pip constraints, e.g. a fleet's exact pins (env EDGED_CONSTRAINTS)
  --destdir DIR        stage every installed path under DIR (env DESTDIR); touches nothing
                       else on the system and runs no systemd tool
  --enable             systemctl enable --now edged (restart if it runs already)
  -h, --help           this text

Environment only: TEGRA_RELEASE (default /etc/nv_tegra_release) is the file that tells the
JetPack release; CMAKE_ARGS is passed to the llama-cpp-python build (default on a Jetson
with CUDA: -DGGML_CUDA=on; on x86-64: AVX2 instead of -march=native).
EOF
}

say() { printf '==> %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

SRC=$(cd "$(dirname "$0")/.." && pwd -P)
# edged.service runs /opt/edged/bin/edged: the venv's place is not an option.
PREFIX=/opt/edged
DESTDIR=${DESTDIR:-}
PYTHON=${PYTHON:-}
ORT_WHEEL=${ORT_WHEEL:-}
ORT_INDEX_URL=${ORT_INDEX_URL:-}
CONSTRAINTS=${EDGED_CONSTRAINTS:-}
TEGRA_RELEASE=${TEGRA_RELEASE:-/etc/nv_tegra_release}
GGUF=${EDGED_GGUF:-1}
SYSTEMD_EXTRA=${EDGED_SYSTEMD_EXTRA:-1}
ENABLE=0

while (($#)); do
    case $1 in
    --ort-wheel) ORT_WHEEL=${2:?--ort-wheel needs a file}; shift ;;
    --ort-index-url) ORT_INDEX_URL=${2:?--ort-index-url needs a URL}; shift ;;
    --python) PYTHON=${2:?--python needs a path}; shift ;;
    --no-gguf) GGUF=0 ;;
    --no-systemd-extra) SYSTEMD_EXTRA=0 ;;
    --constraints) CONSTRAINTS=${2:?--constraints needs a file}; shift ;;
    --destdir) DESTDIR=${2:?--destdir needs a directory}; shift ;;
    --enable) ENABLE=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done

DESTDIR=${DESTDIR%/}
if [[ -n $DESTDIR ]]; then
    mkdir -p "$DESTDIR"
    DESTDIR=$(cd "$DESTDIR" && pwd -P)
    ((ENABLE)) && die "--enable acts on this system: not with DESTDIR"
else
    [[ $(id -u) -eq 0 ]] || die "run as root (or stage with DESTDIR=DIR)"
fi
[[ -z $ORT_WHEEL || -f $ORT_WHEEL ]] || die "no such wheel: $ORT_WHEEL"
[[ -z $CONSTRAINTS || -f $CONSTRAINTS ]] || die "no such constraints file: $CONSTRAINTS"
[[ -z $ORT_WHEEL ]] || ORT_WHEEL=$(cd "$(dirname "$ORT_WHEEL")" && pwd -P)/$(basename "$ORT_WHEEL")
# The venv must be readable by the user edged.
umask 022

### the platform #############################################################################

# /etc/nv_tegra_release, first line: "# R36 (release), REVISION: 4.3, GCID: ..., BOARD: ..."
# L4T R35 is JetPack 5 (Ubuntu 20.04, Python 3.8), R36 JetPack 6 (Ubuntu 22.04, Python 3.10).
PLATFORM=generic
L4T=""
if [[ -r $TEGRA_RELEASE ]]; then
    L4T=$(sed -n -E '1s/^# R([0-9]+) \(release\), REVISION: ([0-9.]+).*/\1.\2/p' "$TEGRA_RELEASE")
    case $L4T in
    35.*) PLATFORM=jetpack5 ;;
    36.*) PLATFORM=jetpack6 ;;
    *) warn "unknown L4T release '${L4T:-?}' in $TEGRA_RELEASE: installing as on any $(uname -m) Linux" ;;
    esac
fi
case $PLATFORM in
jetpack5) say "platform: Jetson, JetPack 5 (L4T R$L4T)" ;;
jetpack6) say "platform: Jetson, JetPack 6 (L4T R$L4T)" ;;
*) say "platform: generic $(uname -m) Linux" ;;
esac

### Python ###################################################################################

py_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; }

if [[ -n $PYTHON ]]; then
    command -v "$PYTHON" >/dev/null || die "no such Python: $PYTHON"
    py_ok "$PYTHON" || die "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); edged needs 3.10 or later"
else
    for candidate in python3 python3.10 python3.11 python3.12 python3.13; do
        if command -v "$candidate" >/dev/null && py_ok "$candidate"; then
            PYTHON=$candidate
            break
        fi
    done
fi
if [[ -z $PYTHON ]]; then
    if [[ $PLATFORM == jetpack5 ]]; then
        die "JetPack 5 ships Python 3.8 and edged needs 3.10 or later. Install Python 3.10,
e.g. from the deadsnakes PPA (Ubuntu 20.04):
    add-apt-repository ppa:deadsnakes/ppa && apt-get update
    apt-get install python3.10 python3.10-venv python3.10-dev
then run again with PYTHON=python3.10 (or --python python3.10). arm64/README.md has more."
    fi
    die "no Python 3.10 or later found (python3: $(python3 --version 2>&1 || echo none)); install one and pass --python"
fi
# The interpreter itself, not a wrapper (a pyenv shim): the venv links to it.
PYTHON=$("$PYTHON" -c 'import sys; print(sys.executable)')
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
say "Python: $PYTHON ($PYVER)"
if [[ $PLATFORM == jetpack6 && $PYVER != 3.10 ]]; then
    warn "JetPack 6's onnxruntime-gpu wheels are built for Python 3.10 (the system's python3)"
fi

# Packages from apt when a build needs them (Debian/Ubuntu); elsewhere, say which are missing.
apt_needed=()
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || apt_needed+=("python$PYVER-venv")
has_python_headers() {
    "$PYTHON" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'
}
if ((SYSTEMD_EXTRA)); then
    command -v pkg-config >/dev/null || apt_needed+=(pkg-config)
    pkg-config --exists libsystemd 2>/dev/null || apt_needed+=(libsystemd-dev)
    command -v cc >/dev/null || apt_needed+=(gcc)
    has_python_headers || apt_needed+=("python$PYVER-dev")
fi
if ((GGUF)); then
    command -v c++ >/dev/null || apt_needed+=(g++)
fi
if ((${#apt_needed[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        say "apt-get install ${apt_needed[*]}"
        apt-get -o DPkg::Lock::Timeout=600 update
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y \
            --no-install-recommends "${apt_needed[@]}"
    else
        die "missing build packages: ${apt_needed[*]} (or use --no-gguf / --no-systemd-extra)"
    fi
fi

### version ranges ###########################################################################

VENV=$DESTDIR$PREFIX
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Kept in the venv, so that what the install allowed can be read later.
constraints=$VENV/edged-constraints.txt
{
    echo "# version ranges arm64/install.sh applied on $PLATFORM, Python $PYVER"
    if [[ $PYVER == 3.10 ]]; then
        # The last releases with cp310 wheels (aarch64 and x86-64); later ones need 3.11.
        echo "numpy>=1.24,<2.3"
        echo "onnxruntime>=1.17,<1.24"
    fi
    if [[ -n $CONSTRAINTS ]]; then
        echo "# from $CONSTRAINTS"
        cat "$CONSTRAINTS"
    fi
} >"$WORK/constraints.txt"

### the venv #################################################################################

if [[ -e $VENV && ! -e $VENV/pyvenv.cfg && -n $(ls -A "$VENV") ]]; then
    die "$VENV exists and is not a Python venv: move it away first"
fi
if [[ -x $VENV/bin/python ]] &&
    [[ $("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) == "$PYVER" ]]; then
    say "venv: updating $VENV"
else
    say "venv: creating $VENV"
    "$PYTHON" -m venv --clear "$VENV"
fi
cp "$WORK/constraints.txt" "$constraints"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade "pip>=23"

extras=()
((GGUF)) && extras+=(gguf)
((SYSTEMD_EXTRA)) && extras+=(systemd)

# Wheels only for the packages whose source build takes hours on a small board (or needs Rust):
# a platform without a wheel fails at once instead.
pip_install=("${pip[@]}" install -c "$constraints" --only-binary=numpy,onnx,onnxruntime,cryptography,pyzmq)

# Which onnxruntime: edged requires "onnxruntime", but onnxruntime-gpu is another distribution of
# the same module (both write onnxruntime/), so with a GPU build the CPU one must not come in.
ort_gpu=""
if [[ -n $ORT_WHEEL ]]; then
    ort_gpu=$ORT_WHEEL
elif [[ -n $ORT_INDEX_URL ]]; then
    say "onnxruntime: fetching onnxruntime-gpu from $ORT_INDEX_URL"
    # Only the wheel comes from that index; its dependencies come from the usual one, below.
    "${pip[@]}" download -q -c "$constraints" --no-deps --only-binary=:all: \
        --index-url "$ORT_INDEX_URL" -d "$WORK/ort" onnxruntime-gpu
    ort_gpu=$(ls "$WORK"/ort/onnxruntime_gpu-*.whl)
fi
if [[ -n $ort_gpu ]]; then
    # onnxruntime_gpu-1.23.0-cp310-cp310-linux_aarch64.whl
    wheel=$(basename "$ort_gpu")
    [[ $wheel == onnxruntime*.whl ]] || die "$wheel is not an onnxruntime wheel"
    wheel_python=$(sed -n -E 's/.*-cp([0-9])([0-9]+)-.*/\1.\2/p' <<<"$wheel")
    [[ -z $wheel_python || $wheel_python == "$PYVER" ]] ||
        die "$wheel is built for Python $wheel_python, the venv's Python is $PYVER (--python)"
fi
previous_gpu=$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("onnxruntime-gpu"))' 2>/dev/null || true)
gpu_version=${ort_gpu:+$(cut -d- -f2 <<<"$(basename "$ort_gpu")")}
gpu_version=${gpu_version:-$previous_gpu}
if [[ -n $gpu_version ]] && "$PYTHON" - "$gpu_version" <<'EOF'; then
import sys
major, minor = (int(part) for part in sys.argv[1].split(".")[:2])
sys.exit((major, minor) >= (1, 19))
EOF
    # onnxruntime before 1.19 was built against numpy 1.x and fails to import with numpy 2.
    echo "numpy<2  # for onnxruntime-gpu $gpu_version" >>"$constraints"
fi

say "pip install edged${extras[*]:+ with ${extras[*]}} from a copy of $SRC"
# Built from a clean copy: pip builds in the source tree, which must stay as it was (and may be
# read-only, or another user's checkout).
mkdir "$WORK/src"
tar -C "$SRC" \
    --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./var \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache \
    --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.hypothesis \
    -cf - . | tar -C "$WORK/src" -xf -
# edged alone first, then its dependencies as its metadata lists them (the chosen extras
# included), onnxruntime left out where a GPU build replaces it.
"${pip_install[@]}" --no-deps "$WORK/src"
"${pip_install[@]}" -q packaging
skip_ort=0
if [[ -n $ort_gpu || -n $previous_gpu ]]; then
    skip_ort=1
    say "(so pip reports that edged requires onnxruntime, not installed: onnxruntime-gpu is)"
fi
mapfile -t deps < <("$VENV/bin/python" - "$skip_ort" "${extras[@]}" <<'EOF'
import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

skip_ort, extras = sys.argv[1] == "1", ["", *sys.argv[2:]]
for line in requires("edged") or []:
    req = Requirement(line)
    if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
        continue
    if skip_ort and req.name == "onnxruntime":
        continue
    req.marker = None
    print(req)
EOF
)
((${#deps[@]})) || die "edged's metadata lists no dependencies"
if ((GGUF)) && [[ -z ${CMAKE_ARGS:-} ]]; then
    if [[ $PLATFORM == jetpack* && -x /usr/local/cuda/bin/nvcc ]]; then
        # llama.cpp with CUDA: GGUF models run on the Jetson's GPU (n_gpu_layers).
        export CMAKE_ARGS="-DGGML_CUDA=on"
        export PATH=/usr/local/cuda/bin:$PATH
    elif [[ $(uname -m) == x86_64 ]]; then
        # As the Makefile does: llama.cpp's default -march=native dies on SIGILL where a VM
        # advertises AVX-512 or AMX it does not enable; AVX2/FMA/F16C runs on every recent CPU.
        export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    fi
fi
say "pip install ${deps[*]} ${CMAKE_ARGS:+(CMAKE_ARGS=$CMAKE_ARGS)}"
"${pip_install[@]}" "${deps[@]}"

if [[ -n $ort_gpu ]]; then
    say "onnxruntime: $(basename "$ort_gpu") in place of PyPI's onnxruntime"
    # Both distributions go first: the module directory they share must come from this wheel.
    "${pip[@]}" uninstall -y -q onnxruntime onnxruntime-gpu 2>/dev/null || true
    "${pip_install[@]}" "$ort_gpu"
elif [[ -n $previous_gpu ]]; then
    say "onnxruntime: keeping onnxruntime-gpu $previous_gpu, installed before"
elif [[ $PLATFORM == jetpack* ]]; then
    warn "no JetPack onnxruntime-gpu wheel given (ORT_WHEEL or ORT_INDEX_URL): PyPI's CPU
onnxruntime is installed and models run on the CPU only. arm64/README.md says where the
JetPack wheels are; run this again with ORT_WHEEL=/path/to/onnxruntime_gpu-...whl."
fi

### check what was installed #################################################################

say "checking the venv"
if ! "$VENV/bin/python" -c 'import onnxruntime, numpy' 2>"$WORK/import.err"; then
    cat "$WORK/import.err" >&2
    die "onnxruntime does not import with numpy $("$VENV/bin/python" -c 'import numpy; print(numpy.__version__)' 2>/dev/null || echo '?');
an onnxruntime built against numpy 1.x needs --constraints with numpy<2 in it"
fi
"$VENV/bin/python" - "$PLATFORM" <<'EOF'
import sys

import numpy
import onnxruntime

import edged
from edged.config import OnnxOptions
from edged.models.onnx import choose_providers

# What the daemon will use for an ONNX model with the default [models.NAME.onnx] providers.
chosen = choose_providers(OnnxOptions().providers, onnxruntime.get_available_providers())
print(f"edged {edged.__version__}, onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}")
print("ONNX models will run on:", ", ".join(chosen))
if sys.argv[1].startswith("jetpack") and "TensorrtExecutionProvider" not in chosen:
    print("WARNING: this onnxruntime has no TensorRT provider", file=sys.stderr)
EOF
"$VENV/bin/python" -m edged config check "$SRC/systemd/edged.toml" >/dev/null

if [[ -n $DESTDIR ]]; then
    # Built where it is staged, run where it is installed: the scripts' #! lines and the
    # activate scripts name the venv by its final path.
    grep -rlIF "$VENV" "$VENV/bin" "$VENV/pyvenv.cfg" | while IFS= read -r file; do
        sed -i "s#$VENV#$PREFIX#g" "$file"
    done
fi
chmod -R a+rX "$VENV"

### systemd files ############################################################################

say "systemd files"
install -D -m 0644 "$SRC/systemd/edged.service" "$DESTDIR/usr/local/lib/systemd/system/edged.service"
for unit in edged-textfile.service edged-textfile.timer; do  # off until enabled
    install -D -m 0644 "$SRC/systemd/$unit" "$DESTDIR/usr/local/lib/systemd/system/$unit"
done
install -D -m 0644 "$SRC/systemd/edged.sysusers" "$DESTDIR/usr/local/lib/sysusers.d/edged.conf"
install -D -m 0644 "$SRC/systemd/edged.tmpfiles" "$DESTDIR/usr/local/lib/tmpfiles.d/edged.conf"
install -d -m 0755 "$DESTDIR/etc/edged"
if [[ -e $DESTDIR/etc/edged/edged.toml ]]; then
    echo "kept $DESTDIR/etc/edged/edged.toml (the shipped one: $SRC/systemd/edged.toml)"
else
    install -m 0644 "$SRC/systemd/edged.toml" "$DESTDIR/etc/edged/edged.toml"
fi
# An upgrade keeps the operator's config: say at once if this version rejects it.
if ! "$VENV/bin/python" -m edged config check "$DESTDIR/etc/edged/edged.toml" >/dev/null; then
    warn "$DESTDIR/etc/edged/edged.toml is not valid for this edged (above): the service will not start until it is fixed"
fi
install -d -m 0755 "$DESTDIR/usr/local/bin"
ln -sfn "$PREFIX/bin/edged" "$DESTDIR/usr/local/bin/edged"
ln -sfn "$PREFIX/bin/edgectl" "$DESTDIR/usr/local/bin/edgectl"
# Mender's update module for edged bundles, where the Mender client looks for update modules
# (docs/OTA.md#mender); harmless on a device without Mender
install -d -m 0755 "$DESTDIR/usr/share/mender/modules/v3"
printf '#!/bin/sh\nexec %s/bin/python -m edged.mender_module "$@"\n' "$PREFIX" \
    >"$DESTDIR/usr/share/mender/modules/v3/edged-bundle"
chmod 0755 "$DESTDIR/usr/share/mender/modules/v3/edged-bundle"

if [[ -n $DESTDIR ]]; then
    say "staged under $DESTDIR; on the device, after copying it to /:"
    systemd_here=0
elif [[ -d /run/systemd/system ]] && command -v systemd-sysusers >/dev/null &&
    command -v systemd-tmpfiles >/dev/null && command -v systemctl >/dev/null; then
    systemd_here=1
else
    ((ENABLE)) && warn "--enable: systemd is not running here (or its tools are missing)"
    say "systemd is not running here (or its tools are missing); on the device, run:"
    systemd_here=0
fi
if ((systemd_here)); then
    systemd-sysusers /usr/local/lib/sysusers.d/edged.conf
    systemd-tmpfiles --create /usr/local/lib/tmpfiles.d/edged.conf
    systemctl daemon-reload
    if ((ENABLE)); then
        if systemctl is-active --quiet edged; then
            systemctl restart edged
        else
            systemctl enable --now edged
        fi
        systemctl --no-pager status edged || true
    elif systemctl is-active --quiet edged; then
        say "edged runs the version it started with: systemctl restart edged"
    else
        say "installed; start it with: systemctl enable --now edged"
    fi
else
    cat <<'EOF'
    systemd-sysusers /usr/local/lib/sysusers.d/edged.conf
    systemd-tmpfiles --create /usr/local/lib/tmpfiles.d/edged.conf
    systemctl daemon-reload
    systemctl enable --now edged
EOF
fi
