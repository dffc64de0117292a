#!/usr/bin/env bash
# Run part of edged's test suite on aarch64, emulated, on any Linux host: a Debian bookworm arm64
# root built with debootstrap, entered with chroot, its binaries run by qemu user-mode emulation,
# with the aarch64 wheels from PyPI (onnxruntime, numpy, pyzmq, ...). Proves that edged installs
# and serves on arm64 without a board at hand. `make arm64-test` runs this; see arm64/README.md.
#
# Needs root (apt-get, mount, chroot). The root is cached under build/arm64-root and reused by
# the next run; `rm -rf build/arm64-root` (with no run going) starts afresh.
#
# Environment:
#   ARM64_TESTS   the test files or node ids to run (default: DEFAULT_TESTS below)
#   ARM64_DESELECT  node ids left out (default: DEFAULT_DESELECT below; "" runs them all)
#   PYTEST_ARGS   more pytest arguments, e.g. "-x -v"
#   MIRROR        the Debian mirror for debootstrap (default: the one the host's apt uses)
#   QEMU_CPU      the emulated CPU (default neoverse-n1)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd -P)
# host_mirror, copy_host_pip_config, local_paths
# shellcheck source=arm64/debian-root.sh
source "$REPO/arm64/debian-root.sh"
BUILD=$REPO/build
ROOT=$BUILD/arm64-root
SUITE=bookworm
# The project's tests in the root run in this venv (the root's own Python, 3.11 on bookworm).
VENV=/opt/edged-test
# Where the project is copied inside the root.
SRC=/src/edged
CPUINFO=$BUILD/arm64-cpuinfo
LOG=$BUILD/arm64-test.log
export QEMU_CPU=${QEMU_CPU:-neoverse-n1}

# What runs: everything that needs neither llama-cpp-python (no aarch64 wheel on PyPI; building it
# under emulation takes far too long) nor systemd-python (a compile) nor a host systemd. It includes
# real inference through real daemon subprocesses over their IPC sockets (test_serving,
# test_bad_input, test_third_party_model), ONNX text encoders (tokenizers) and vector collections
# (usearch, SQLite). Left out: test_gguf*, test_text_protocol,
# test_candidates and test_swap (GGUF models), test_journald and test_systemd_unit (systemd).
DEFAULT_TESTS="tests/test_protocol.py tests/test_config.py tests/test_models.py
tests/test_onnx_size.py tests/test_serving.py tests/test_bad_input.py
tests/test_third_party_model.py tests/test_frame_steps.py tests/test_box_steps.py
tests/test_pipelines.py tests/test_chains.py tests/test_regions.py tests/test_output_binding.py
tests/test_text_encoder.py tests/test_collections.py tests/test_collections_live.py"
TESTS=${ARM64_TESTS:-$DEFAULT_TESTS}
# Three tests assume native speed. Emulated, the tests' slow model took 16 s for a batch
# of 256 rows (0.06 s natively): batches queued behind it outlast the 30 s these tests wait for
# each reply, and a model's first run misses a 50 ms deadline.
# And qemu-user hands a process at most the fds its buffer has room for without setting
# MSG_CTRUNC, so a register with 10 fds reads as one with 8 (still refused, with another message).
# The budget test fills a collection with thousands of 1024-d vectors until the budget refuses
# them: emulated HNSW insertion takes longer than the test's 120 s.
DEFAULT_DESELECT="tests/test_serving.py::test_full_queue_answers_busy_at_once_and_loses_nothing
tests/test_serving.py::test_slow_model_does_not_block_another_model
tests/test_serving.py::test_deadline_shorter_than_the_batch_delay_runs_in_time
tests/test_regions.py::test_malformed_messages_are_answered_and_the_connection_stays
tests/test_collections_live.py::test_a_collections_index_is_charged_to_the_memory_budget"
DESELECT=${ARM64_DESELECT-$DEFAULT_DESELECT}

say() { printf '\n== %s\n' "$*"; }
die() { printf 'arm64-test: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (apt-get, mount and chroot)"
mkdir -p "$BUILD"

# One run at a time: two runs would mount over and delete each other's root.
exec 9>"$BUILD/arm64-test.lock"
flock -n 9 || die "another arm64 test run holds $BUILD/arm64-test.lock"

declare -A took=()
phase_start=0
begin() { say "$1"; phase_start=$SECONDS; }
finish() { took[$1]=$((SECONDS - phase_start)); }

# Every mount point under the root, deepest first (read from the kernel, so that mounts left by
# an interrupted run or by debootstrap are found too).
mounts_under_root() {
    awk -v root="$ROOT" '$2 == root || index($2, root "/") == 1 { print $2 }' /proc/self/mounts |
        sort -r
}

unmount_all() {
    local point
    while read -r point; do
        [[ -n $point ]] || continue
        umount "$point" 2>/dev/null || umount -l "$point" || true
    done < <(mounts_under_root)
}

# Runs on any exit, failure included: nothing stays mounted under the root.
trap unmount_all EXIT
trap 'exit 130' INT TERM

# Deleting inside the root while a host directory is bind-mounted there (a pip find-links
# directory, read-only) could reach the host's files: refuse unless nothing is mounted under it.
safe_rm_root_path() {
    unmount_all
    [[ -z $(mounts_under_root) ]] || die "cannot unmount everything under $ROOT"
    rm -rf --one-file-system "$@"
}

### host tools ###############################################################################

begin "host packages: debootstrap, qemu-user-static, binfmt-support"
host_arch=$(uname -m)
needed=()
command -v debootstrap >/dev/null || needed+=(debootstrap)
if [[ $host_arch != aarch64 ]]; then
    command -v qemu-aarch64-static >/dev/null || needed+=(qemu-user-static)
    command -v update-binfmts >/dev/null || needed+=(binfmt-support)
fi
if ((${#needed[@]})); then
    # Wait for another apt (an unattended upgrade, a parallel build) rather than fail.
    apt-get -o DPkg::Lock::Timeout=600 update
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y \
        --no-install-recommends "${needed[@]}"
else
    echo "already installed"
fi
finish host

if [[ $host_arch != aarch64 ]]; then
    begin "binfmt_misc: aarch64 binaries run by qemu-aarch64-static"
    if [[ ! -e /proc/sys/fs/binfmt_misc/status ]]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
        update-binfmts --enable qemu-aarch64 || true
    fi
    if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
        # Without binfmt-support's daemon (no systemd here, e.g. in a container): register the
        # line qemu-user-static ships for systemd-binfmt.
        conf=/usr/lib/binfmt.d/qemu-aarch64.conf
        [[ -r $conf ]] || die "qemu-aarch64 is not registered with binfmt_misc and $conf is missing"
        grep -v '^[#;]' "$conf" | grep . >/proc/sys/fs/binfmt_misc/register
    fi
    [[ $(head -n1 /proc/sys/fs/binfmt_misc/qemu-aarch64) == enabled ]] ||
        die "the qemu-aarch64 binfmt handler is registered but disabled"
    # The F flag opens the interpreter at registration, so the root needs no copy of it.
    grep -E '^(interpreter|flags)' /proc/sys/fs/binfmt_misc/qemu-aarch64
    finish binfmt
fi

### the arm64 root ###########################################################################

if [[ ! -e $ROOT/.edged-root-complete ]]; then
    begin "debootstrap: Debian $SUITE arm64 (minbase) into $ROOT"
    mirror=${MIRROR:-$(host_mirror)}
    mirror=${mirror%%$'\n'*} # the first one found
    [[ -n $mirror ]] || die "no Debian $SUITE mirror in the host's apt sources; set MIRROR"
    echo "mirror: $mirror"
    # A root without the marker is what an interrupted run left: start it again.
    [[ -e $ROOT ]] && safe_rm_root_path "$ROOT"
    debootstrap --arch=arm64 --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates \
        "$SUITE" "$ROOT" "$mirror"
    touch "$ROOT/.edged-root-complete"
    finish debootstrap
else
    say "debootstrap: reusing $ROOT"
    took[debootstrap]=0
fi

# Not needed with the F flag, but lets the root work with a handler registered without it.
if [[ $host_arch != aarch64 ]]; then
    cp /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/"
fi

### mounts ###################################################################################

unmount_all # whatever an interrupted run left

bind() { # bind SOURCE TARGET [ro]
    mount --bind "$1" "$2"
    [[ ${3:-} == ro ]] && mount -o remount,bind,ro "$2"
    return 0
}

mount -t proc proc "$ROOT/proc"
mount -t sysfs -o ro sysfs "$ROOT/sys"
# A /dev of its own rather than a bind of the host's: a `rm -rf build` while a run is going must
# not reach the host's device nodes.
mount -t tmpfs -o mode=0755,nosuid tmpfs "$ROOT/dev"
for node in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
    IFS=: read -r name major minor <<<"$node"
    mknod -m 0666 "$ROOT/dev/$name" c "$major" "$minor"
done
mkdir "$ROOT/dev/pts" "$ROOT/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$ROOT/dev/pts"
ln -s pts/ptmx "$ROOT/dev/ptmx"
ln -s /proc/self/fd "$ROOT/dev/fd"
ln -s /proc/self/fd/0 "$ROOT/dev/stdin"
ln -s /proc/self/fd/1 "$ROOT/dev/stdout"
ln -s /proc/self/fd/2 "$ROOT/dev/stderr"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$ROOT/dev/shm"
# The tests' IPC sockets and temporary models; gone at unmount.
mount -t tmpfs -o mode=1777 tmpfs "$ROOT/tmp"

# The emulated process sees the host's /proc/cpuinfo, an x86 one, and onnxruntime's CPU
# detection (cpuinfo) aborts on it. Show it an ARM server core, one entry per host CPU.
{
    for ((cpu = 0; cpu < $(nproc); cpu++)); do
        printf 'processor\t: %d\n' "$cpu"
        printf 'BogoMIPS\t: 50.00\n'
        printf 'Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp '
        printf 'cpuid asimdrdm lrcpc dcpop asimddp ssbs\n'
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\n'
        printf 'CPU part\t: 0xd0c\nCPU revision\t: 1\n\n'
    done
} >"$CPUINFO"
bind "$CPUINFO" "$ROOT/proc/cpuinfo" ro

### network and pip configuration ############################################################

cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
[[ -r /etc/hosts ]] && cp /etc/hosts "$ROOT/etc/hosts"

# pip in the root must reach the same package index as the host's pip: the host's pip config
# files go to the same places in the root (the user's under /root), every local file they or a
# PIP_* variable name (constraints, certificates) is copied, every local directory (find-links,
# file:// indexes) bind-mounted read-only. Copies from an earlier run go first.
copy_host_pip_config
while read -r path; do
    path=${path%/}
    case $path in "" | /etc | /usr | /opt | /home | /root | /var | /tmp | /proc | /sys | /dev) continue ;; esac
    if [[ -f $path ]]; then
        mkdir -p "$(dirname "$ROOT$path")"
        cp "$path" "$ROOT$path"
    elif [[ -d $path ]]; then
        # A local PEP 503 index links its files relative to simple/ (../../files/...).
        [[ $(basename "$path") == simple ]] && path=$(dirname "$path")
        [[ -n $(awk -v p="$ROOT$path" '$2 == p' /proc/self/mounts) ]] && continue
        mkdir -p "$ROOT$path"
        bind "$path" "$ROOT$path" ro
    fi
done < <(local_paths)

# The host's CA certificates (a TLS-inspecting proxy's CA included), for pip in the root.
host_ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
if [[ -r $host_ca ]]; then
    mkdir -p "$(dirname "$ROOT$host_ca")"
    cp "$host_ca" "$ROOT$host_ca"
fi

# A clean environment in the root: the host's PIP_* and proxy variables, nothing else.
root_env=(
    PATH=$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    HOME=/root LANG=C.UTF-8 QEMU_CPU="$QEMU_CPU" PIP_DISABLE_PIP_VERSION_CHECK=1
)
[[ -r $host_ca ]] && root_env+=(PIP_CERT="$host_ca")
while IFS= read -r var; do
    root_env+=("$var")
done < <(env | grep -E '^(PIP_[A-Z_]*|https?_proxy|HTTPS?_PROXY|no_proxy|NO_PROXY)=' | grep -v '^PIP_CERT=')

in_root() { chroot "$ROOT" /usr/bin/env -i "${root_env[@]}" "$@"; }

### the project ##############################################################################

say "copying the project to $SRC in the root"
if awk -v p="$ROOT$SRC" 'index($2, p) == 1 { found = 1 } END { exit !found }' /proc/self/mounts; then
    die "something is mounted under $ROOT$SRC"
fi
rm -rf --one-file-system "$ROOT$SRC"
mkdir -p "$ROOT$SRC"
# A copy, not a bind mount: the root's install must not write into the host tree.
tar -C "$REPO" \
    --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./var \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache \
    --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.hypothesis \
    -cf - . | tar -C "$ROOT$SRC" -xf -

# Installed once, again when pyproject.toml changes. Editable: the copy above is refreshed at
# every run and the venv serves it as it is. Neither the gguf nor the systemd extra.
INSTALL_RECIPE="edged[dev] editable, silero-vad --no-deps"
stamp=$({ cat "$REPO/pyproject.toml"; echo "$INSTALL_RECIPE"; } | sha256sum | cut -d' ' -f1)
if [[ $(cat "$ROOT$VENV/.edged-installed" 2>/dev/null) != "$stamp" ]]; then
    begin "pip install: edged[dev] and silero-vad in the root's venv"
    [[ -x $ROOT$VENV/bin/python ]] || in_root python3 -m venv "$VENV"
    in_root sh -c "cd $SRC && pip install --prefer-binary -e '.[dev]'"
    # Its ONNX models only; torch, its dependency, is not needed for them.
    in_root pip install --prefer-binary --no-deps silero-vad
    echo "$stamp" >"$ROOT$VENV/.edged-installed"
    finish pip
else
    say "pip install: $VENV is up to date"
    took[pip]=0
fi

### the tests ################################################################################

say "aarch64"
arch=$(in_root uname -m)
echo "uname -m: $arch"
in_root python -c '
import platform, numpy, onnxruntime
print("python", platform.python_version(), "on", platform.machine())
print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
print("numpy", numpy.__version__)'
[[ $arch == aarch64 ]] || die "the root runs $arch, not aarch64"

deselect=""
for node in $DESELECT; do deselect+=" --deselect $node"; done
begin "pytest (QEMU_CPU=$QEMU_CPU): $(echo $TESTS)${deselect}"
set +e
# arm64/emulation_plugin.py: hypothesis' too_slow health check off (see there).
# shellcheck disable=SC2086 # the test list and PYTEST_ARGS are word lists
in_root sh -c "cd $SRC && exec python -m pytest -p no:cacheprovider -p arm64.emulation_plugin \
    ${PYTEST_ARGS:-} $(echo $TESTS)$deselect" |
    tee "$LOG"
status=${PIPESTATUS[0]}
set -e
finish tests

say "summary"
echo "uname -m in the root: $arch"
in_root python -c 'import platform, onnxruntime; print("platform.machine():", platform.machine()); print("onnxruntime:", onnxruntime.__version__)'
echo "pytest: $(grep -E '^=+ .* in [0-9.]+s.* =+$' "$LOG" | tail -n1)"
for phase in host binfmt debootstrap pip tests; do
    if [[ -n ${took[$phase]:-} ]]; then printf '%-12s %4d s\n' "$phase" "${took[$phase]}"; fi
done
printf '%-12s %4d s\n' total "$SECONDS"
exit "$status"
