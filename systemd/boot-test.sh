#!/usr/bin/env bash
# Prove edged.service for real: a Debian bookworm root booted with systemd as PID 1 in a
# container (systemd-nspawn), edged installed in it by arm64/install.sh, then the unit's promises
# checked one by one: Type=notify readiness, the status line, reload, the watchdog (a hung daemon
# and a stuck model run), the journal fields, the sandbox, socket access by group, an OTA bundle
# through the inbox, a clean stop, a start at boot. `make systemd-test` runs this; see
# systemd/README.md.
#
# Needs root (apt-get, debootstrap, systemd-nspawn, nsenter). The root is cached under
# build/systemd-root and reused by the next run (rebuilt when the package list changes);
# `rm -rf build/systemd-root` (with no run going) starts afresh. Each check prints one line,
# `PASS name` or `FAIL name: why` (`SKIP name: why` where this machine cannot tell); the exit
# status is 1 when any check failed. Everything else goes to build/systemd-test.log, the
# container's console to build/systemd-test.console.log.
#
# Environment:
#   MIRROR        the Debian mirror for debootstrap (default: the one the host's apt uses)
#   WATCHDOG_S    WatchdogSec= of the test's drop-in (default 6; the unit says 30 s)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd -P)
# host_mirror, copy_host_pip_config, local_paths
# shellcheck source=arm64/debian-root.sh
source "$REPO/arm64/debian-root.sh"
BUILD=$REPO/build
ROOT=$BUILD/systemd-root
SUITE=bookworm
# What the root holds: systemd as PID 1, and what arm64/install.sh needs to build the venv
# with the systemd extra (systemd-python compiles against libsystemd).
PACKAGES=(systemd systemd-sysv dbus python3 python3-venv python3-dev gcc libc6-dev libsystemd-dev
    pkg-config procps ca-certificates)
LOG=$BUILD/systemd-test.log
CONSOLE_LOG=$BUILD/systemd-test.console.log
# Where the project is copied inside the root, and where the test keeps its files there.
SRC=/src/edged
WORK=/root/edged-test
# The checks' Python side, run with the service's own venv.
PYCHECKS=(/opt/edged/bin/python "$SRC/systemd/boot_checks.py")
CONTROL=ipc:///run/edged/control.sock
MACHINE=edged-boot-test
# The unit's WatchdogSec=30s and RestartSec=10s would make each watchdog check last 40 s: the
# test's drop-in shortens both (the mechanism is the same).
WATCHDOG_S=${WATCHDOG_S:-6}
RESTART_S=1

# The original stdout and stderr: PASS/FAIL lines and phase headers go there and to the log,
# everything else to the log only.
exec 3>&1 4>&2
LOGGING=0
out() {
    printf '%s\n' "$*" >&3
    ((LOGGING)) && printf '%s\n' "$*"
    return 0
}
say() { out "== $*"; }
die() {
    printf 'systemd-test: %s\n' "$*" >&4
    ((LOGGING)) && printf 'systemd-test: %s\n' "$*"
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root (apt-get, debootstrap, systemd-nspawn, nsenter)"
mkdir -p "$BUILD"

# One run at a time: two runs would boot the same root twice.
exec 9>"$BUILD/systemd-test.lock"
flock -n 9 || die "another systemd test run holds $BUILD/systemd-test.lock"
: >"$LOG"
exec >>"$LOG" 2>&1
LOGGING=1
umask 022

declare -A took=()
phase_start=0
begin() { say "$1"; phase_start=$SECONDS; }
finish() { took[$1]=$((SECONDS - phase_start)); }

### cleanup ##################################################################################

NSPAWN_PID=""
CT_PID=""
# The PID and mount namespaces of every boot: a process still in one after poweroff is a
# leftover.
CT_NAMESPACES=()

# Every mount point under the root, deepest first, as the host sees them (nspawn mounts in a
# namespace of its own: anything here is a leftover).
mounts_under_root() {
    awk -v root="$ROOT" '$2 == root || index($2, root "/") == 1 { print $2 }' /proc/self/mounts |
        sort -r
}

# Processes of the container: in a PID or mount namespace of one of its boots (this includes
# an nsenter that waits for a command it runs there), or with their root directory in the root
# (seen from here, a container's processes have "/" as theirs).
processes_in_root() {
    local proc root pidns mntns known
    for proc in /proc/[0-9]*; do
        root=$(readlink "$proc/root" 2>/dev/null) || continue
        pidns=$(readlink "$proc/ns/pid" 2>/dev/null) || continue
        mntns=$(readlink "$proc/ns/mnt" 2>/dev/null) || continue
        if [[ $root == "$ROOT" || $root == "$ROOT"/* ]]; then
            echo "${proc#/proc/}"
            continue
        fi
        for known in "${CT_NAMESPACES[@]}"; do
            [[ $pidns == "$known" || $mntns == "$known" ]] && echo "${proc#/proc/}" && break
        done
    done
    return 0
}

# The nsenter processes on this side of the container (the host's PID namespace, the
# container's mount namespace): each waits for a command it runs in the container.
helpers_in_container() {
    local pid host_pidns
    host_pidns=$(readlink /proc/self/ns/pid)
    for pid in $(processes_in_root); do
        [[ $(readlink "/proc/$pid/ns/pid" 2>/dev/null) == "$host_pidns" ]] && echo "$pid"
    done
    return 0
}

# Waits up to $1 s for the nspawn process to end; 0 when it has.
nspawn_gone_within() {
    local deadline=$((SECONDS + $1))
    while [[ -n $NSPAWN_PID ]] && kill -0 "$NSPAWN_PID" 2>/dev/null; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
    return 0
}

# Ends the container: an orderly poweroff, then SIGTERM to nspawn (which halts the container),
# then SIGKILL, each by PID. Returns 1 when it took more than the poweroff.
stop_container() {
    local status=0 pid
    if [[ -n $NSPAWN_PID ]] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        # A command still running in the container (a failure or Ctrl-C cut this script short)
        # would hold up its shutdown: systemd-shutdown stops every process first, nsenter then
        # stops itself as well, and the command, killed, is never reaped.
        for pid in $(helpers_in_container); do
            echo "ending nsenter $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"
            kill -KILL "$pid" 2>/dev/null || true
        done
        if [[ -n $CT_PID ]]; then
            timeout 10 nsenter -t "$CT_PID" -a systemctl poweroff --no-block || true
        fi
        if ! nspawn_gone_within 60; then
            status=1
            echo "the container did not power off within 60 s: SIGTERM to nspawn ($NSPAWN_PID)"
            kill -TERM "$NSPAWN_PID" 2>/dev/null || true
            if ! nspawn_gone_within 20; then
                echo "nspawn ($NSPAWN_PID) still runs: SIGKILL"
                kill -KILL "$NSPAWN_PID" 2>/dev/null || true
                nspawn_gone_within 10 || true
            fi
        fi
        wait "$NSPAWN_PID" 2>/dev/null || true
    fi
    NSPAWN_PID="" CT_PID=""
    for pid in $(processes_in_root); do
        status=1
        echo "left in the root: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) ($pid): SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    done
    return "$status"
}

cleanup() {
    local point
    stop_container || true
    while read -r point; do
        [[ -n $point ]] || continue
        umount "$point" 2>/dev/null || umount -l "$point" || true
    done < <(mounts_under_root)
}
trap cleanup EXIT
trap 'out "interrupted: powering the container off"; exit 130' INT TERM
# A step outside the checks that fails ends the run (set -e): say where, not only in the log.
trap 'out "systemd-test: the command at line $LINENO failed (exit $?); see $LOG"' ERR

### host tools ###############################################################################

begin "host packages: debootstrap, systemd-container"
needed=()
command -v debootstrap >/dev/null || needed+=(debootstrap)
command -v systemd-nspawn >/dev/null || needed+=(systemd-container)
command -v nsenter >/dev/null || needed+=(util-linux)
if ((${#needed[@]})); then
    # Wait for another apt (an unattended upgrade, a parallel build) rather than fail.
    apt-get -o DPkg::Lock::Timeout=600 update
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y \
        --no-install-recommends "${needed[@]}"
else
    echo "already installed"
fi
systemd-nspawn --version | sed -n 1p
finish host

### the root #################################################################################

# The marker holds what the root was built from: another package list means another root.
recipe=$(printf '%s minbase %s' "$SUITE" "${PACKAGES[*]}" | sha256sum | cut -d' ' -f1)
if [[ $(cat "$ROOT/.edged-root-complete" 2>/dev/null) != "$recipe" ]]; then
    begin "debootstrap: Debian $SUITE (minbase) with systemd into $ROOT"
    mirror=${MIRROR:-$(host_mirror)}
    mirror=${mirror%%$'\n'*} # the first one found
    [[ -n $mirror ]] || die "no Debian $SUITE mirror in the host's apt sources; set MIRROR"
    echo "mirror: $mirror"
    # An older recipe, or what an interrupted run left. Nothing may be mounted under it (the
    # lock keeps other runs out; a leftover mount would take rm into the host's files).
    if [[ -e $ROOT ]]; then
        cleanup
        [[ -z $(mounts_under_root) ]] || die "cannot unmount everything under $ROOT"
        rm -rf --one-file-system "$ROOT"
    fi
    debootstrap --variant=minbase --include="$(IFS=,; echo "${PACKAGES[*]}")" \
        "$SUITE" "$ROOT" "$mirror"
    echo "$recipe" >"$ROOT/.edged-root-complete"
    finish debootstrap
else
    say "debootstrap: reusing $ROOT"
    took[debootstrap]=0
fi

### what the root gets from the host: the project, pip's configuration, CA certificates ######

begin "copying the project and the host's pip configuration into the root"
# A copy, not a bind mount: the install in the root must not write into the host tree.
rm -rf --one-file-system "$ROOT$SRC"
mkdir -p "$ROOT$SRC"
tar -C "$REPO" \
    --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude=./var \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache \
    --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.hypothesis \
    -cf - . | tar -C "$ROOT$SRC" -xf -
# The checks run boot_checks.py as users other than root too.
chmod -R a+rX "$ROOT$SRC"

# pip in the root must reach the same package index as the host's pip: the host's pip config
# files go to the same places in the root (the user's under /root), every local file they or a
# PIP_* variable name (constraints, certificates) is copied, every local directory (find-links,
# file:// indexes) bind-mounted read-only into the container. Copies from an earlier run go first.
copy_host_pip_config
binds=()
while read -r path; do
    path=${path%/}
    case $path in "" | /etc | /usr | /opt | /home | /root | /var | /tmp | /proc | /sys | /dev | /run) continue ;; esac
    if [[ -f $path ]]; then
        mkdir -p "$(dirname "$ROOT$path")"
        cp "$path" "$ROOT$path"
    elif [[ -d $path ]]; then
        # A local PEP 503 index links its files relative to simple/ (../../files/...).
        [[ $(basename "$path") == simple ]] && path=$(dirname "$path")
        binds+=("--bind-ro=$path")
    fi
done < <(local_paths)
mapfile -t binds < <(printf '%s\n' "${binds[@]}" | sort -u | grep .)
((${#binds[@]} == 0)) || echo "bound read-only into the container: ${binds[*]#--bind-ro=}"

# The host's local CA certificates (a TLS-inspecting proxy's CA included): the root's
# update-ca-certificates adds them to its bundle once the container runs.
rm -rf "$ROOT/usr/local/share/ca-certificates"
mkdir -p "$ROOT/usr/local/share/ca-certificates"
if compgen -G '/usr/local/share/ca-certificates/*' >/dev/null; then
    cp -a /usr/local/share/ca-certificates/. "$ROOT/usr/local/share/ca-certificates/"
fi

# A clean environment for every command in the container: the host's PIP_* and proxy
# variables, nothing else.
ct_env=(
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    HOME=/root LANG=C.UTF-8 SYSTEMD_PAGER= SYSTEMD_COLORS=0 PYTHONDONTWRITEBYTECODE=1
)
while IFS= read -r var; do
    ct_env+=("$var")
done < <(env | grep -E '^(PIP_[A-Z_]*|https?_proxy|HTTPS?_PROXY|no_proxy|NO_PROXY)=')
finish copy

### the container ############################################################################

# A command in the container (all its namespaces, its root), its stdin kept: at most
# $CT_TIMEOUT s (default 120). Started in the background and waited for, so that Ctrl-C
# interrupts the wait at once (a command in the foreground would have to end first, and one
# that catches SIGINT itself would keep the script from stopping at all); the cleanup then ends
# it with the container.
ct() {
    timeout -k 5 "${CT_TIMEOUT:-120}" \
        nsenter -t "$CT_PID" -a -- /usr/bin/env -i "${ct_env[@]}" "$@" 0<&0 &
    wait "$!"
}

# The reason of the check that runs, set by `try` and `wait_for`.
why=""

# try WHAT COMMAND...: run it; when it fails, WHAT (and its exit status) is the check's reason.
try() {
    local what=$1
    shift
    "$@" && return 0
    why="$what (exit $?)"
    return 1
}

# wait_for SECONDS WHAT COMMAND...: poll COMMAND every half second until it succeeds; after
# SECONDS the check fails, saying what it waited for (COMMAND's last output goes to the log).
wait_for() {
    local limit=$1 what=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "gave up waiting for $what; the last try said:"
            "$@" || true
            why="timed out after ${limit} s waiting for $what"
            return 1
        fi
        sleep 0.5
    done
}

# Starts systemd in the root as PID 1 of a container. The host's PID 1 is not systemd, so the
# container is neither registered with machined nor given a scope of its own; started detached,
# its console (read-only) goes to the console log.
boot() {
    echo "--- boot $(date -Is)" >>"$CONSOLE_LOG"
    setsid systemd-nspawn -D "$ROOT" -M "$MACHINE" --register=no --keep-unit \
        --console=read-only "${binds[@]}" -b </dev/null >>"$CONSOLE_LOG" 2>&1 3>&- 4>&- 9>&- &
    NSPAWN_PID=$!
    local deadline=$((SECONDS + 30))
    CT_PID=""
    until [[ -n $CT_PID ]]; do
        if ! kill -0 "$NSPAWN_PID" 2>/dev/null; then
            why="systemd-nspawn exited at once; see $CONSOLE_LOG"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            why="no container PID 1 (systemd) under systemd-nspawn ($NSPAWN_PID) after 30 s"
            return 1
        fi
        sleep 0.2
        CT_PID=$(pgrep -P "$NSPAWN_PID" -x systemd | head -n1 || true)
    done
    CT_NAMESPACES+=("$(readlink "/proc/$CT_PID/ns/pid")" "$(readlink "/proc/$CT_PID/ns/mnt")")
    echo "systemd-nspawn $NSPAWN_PID, the container's PID 1 is $CT_PID on the host (${CT_NAMESPACES[*]: -2})"
    local state
    deadline=$((SECONDS + 120))
    while :; do
        state=$(CT_TIMEOUT=10 ct systemctl is-system-running 2>/dev/null || true)
        [[ $state == running || $state == degraded ]] && break
        if ((SECONDS >= deadline)); then
            why="the container's systemd did not finish booting within 120 s (is-system-running: ${state:-no answer}); see $CONSOLE_LOG"
            return 1
        fi
        sleep 0.5
    done
    echo "systemctl is-system-running: $state"
    if [[ $state == degraded ]]; then
        out "note: the container booted degraded; failed units:"
        ct systemctl --failed --no-legend --plain | sed 's/^/  /' >&3
    fi
}

power_off() {
    ct systemctl poweroff --no-block || true
    if ! nspawn_gone_within 60; then
        why="the container did not power off within 60 s"
        stop_container || true
        return 1
    fi
    wait "$NSPAWN_PID" 2>/dev/null || true
    NSPAWN_PID="" CT_PID=""
}

begin "boot: systemd as PID 1 in $ROOT"
boot || die "$why"
finish boot

### edged ####################################################################################

begin "install: arm64/install.sh --no-gguf in the container"
# What an earlier run left (the root is reused): the service, its state and config, the test's
# files and users. The venv /opt/edged stays: install.sh updates it in place.
ct sh -c 'systemctl disable --now edged.service; systemctl reset-failed edged.service' || true
ct rm -rf /etc/edged /var/lib/edged /var/cache/edged /run/edged \
    /etc/systemd/system/edged.service.d "$WORK"
for user in sensor stranger; do ct userdel "$user" 2>/dev/null || true; done
ct update-ca-certificates
CT_TIMEOUT=1200 ct bash "$SRC/arm64/install.sh" --no-gguf ||
    die "arm64/install.sh failed in the container; see $LOG"
ct mkdir -p "$WORK" /etc/edged/models
ct cp /etc/edged/edged.toml "$WORK/shipped.toml"
ct useradd --no-create-home --shell /usr/sbin/nologin --groups edged sensor
ct useradd --no-create-home --shell /usr/sbin/nologin stranger
# As systemd/README.md says (`systemctl enable --now edged`), less the start, which the first
# check makes. Enabled, the unit also stays loaded once stopped: systemd unloads an inactive
# unit nothing refers to, and its exit status with it.
ct systemctl enable edged.service
finish install

### checks ###################################################################################

failures=()
note=""

# The status a check function returns when this machine cannot tell (its `why` says why).
CANNOT_TELL=2

# check NAME FUNCTION [ARGS]: PASS, FAIL or SKIP on one line; the function sets `why` when it
# fails or cannot tell, and may set `note` (facts shown after PASS).
check() {
    local name=$1 status=0
    shift
    why="" note=""
    echo "--- check $name $(date -Is)"
    "$@" || status=$?
    if ((status == 0)); then
        out "PASS $name${note:+ ($note)}"
    elif ((status == CANNOT_TELL)); then
        out "SKIP $name: $why"
    else
        out "FAIL $name: ${why:-see $LOG}"
        failures+=("$name")
    fi
}

prop() { ct systemctl show -p "$1" --value edged.service; }
edgectl() { ct edgectl --control "$CONTROL" "$@"; }
is_active() { [[ $(prop ActiveState) == active ]]; }
checks() { ct "${PYCHECKS[@]}" "$@"; }
serving() { [[ $(checks serving "$1" | cut -d' ' -f1) == "$2" ]]; }
# journal since $1 (epoch seconds), this boot, edged's unit, and the further matches given
journal() {
    local since=$1
    shift
    ct journalctl --no-pager -b -u edged.service --since "@$since" "$@"
}
# stdin -> the file $1 in the container
write_file() {
    # shellcheck disable=SC2016 # $1 is the inner shell's
    ct sh -c 'cat >"$1"' sh "$1"
}
# journal_has SINCE MATCHES...: edged's journal since SINCE has a record with these fields
journal_has() { [[ -n $(journal "$@" -o cat) ]]; }

check_start_after_ready() {
    local type access state started active
    type=$(prop Type) access=$(prop NotifyAccess)
    [[ $type == notify && $access == main ]] ||
        { why="Type=$type NotifyAccess=$access, not notify/main"; return 1; }
    try "systemctl start edged failed" ct systemctl start edged.service || return 1
    state=$(prop ActiveState)
    [[ $state == active ]] || { why="ActiveState=$state right after systemctl start returned"; return 1; }
    # At once, no retry: the sockets must be bound when start returns.
    try "edgectl status failed right after systemctl start returned" edgectl --timeout 3 status ||
        return 1
    try "an infer on /run/edged/infer.sock failed right after start" \
        checks infer demo --shape 1x16 --timeout 3 || return 1
    started=$(prop ExecMainStartTimestampMonotonic) active=$(prop ActiveEnterTimestampMonotonic)
    ((active > started)) || { why="active at $active us, not after the start at $started us"; return 1; }
    note="Type=notify NotifyAccess=main; READY=1 came $(((active - started) / 1000)) ms after exec"
}

status_names_demo() { [[ $(prop StatusText) == serving*demo*MiB* ]]; }

check_status_text() {
    try "StatusText never named the demo model" wait_for 10 "StatusText naming the demo model" \
        status_names_demo || return 1
    note="StatusText=$(prop StatusText)"
}

check_sandbox() {
    local pid status cap seccomp nnp usr_mount
    pid=$(prop MainPID)
    status=$(ct cat "/proc/$pid/status") || { why="cannot read /proc/$pid/status"; return 1; }
    seccomp=$(awk '$1 == "Seccomp:" { print $2 }' <<<"$status")
    cap=$(awk '$1 == "CapEff:" { print $2 }' <<<"$status")
    nnp=$(awk '$1 == "NoNewPrivs:" { print $2 }' <<<"$status")
    [[ $seccomp == 2 ]] || { why="Seccomp: ${seccomp:-?} in /proc/$pid/status, not 2 (filter)"; return 1; }
    [[ $cap =~ ^0+$ ]] || { why="CapEff: $cap, not 0"; return 1; }
    [[ $nnp == 1 ]] || { why="NoNewPrivs: ${nnp:-?}, not 1"; return 1; }
    # The mount that holds /usr in the daemon's mount namespace (the longest mount point that
    # is a prefix of /usr), and a write attempt there as root.
    # shellcheck disable=SC2016 # awk's fields
    usr_mount=$(ct awk '{ p = $5; if ((p == "/" || p == "/usr" || index("/usr", p "/") == 1) &&
        length(p) >= length(best)) { best = p; opts = $6 } } END { print best, opts }' \
        "/proc/$pid/mountinfo")
    [[ " ${usr_mount#* }" =~ [\ ,]ro(,|$) ]] ||
        { why="/usr is on mount ${usr_mount%% *} with options ${usr_mount#* } for the service"; return 1; }
    if ct nsenter -t "$pid" -m -- touch /usr/edged-write-test; then
        ct nsenter -t "$pid" -m -- rm -f /usr/edged-write-test
        why="root wrote /usr/edged-write-test in the service's mount namespace"
        return 1
    fi
    note="MainPID $pid: Seccomp 2, CapEff 0, NoNewPrivs 1, /usr on ${usr_mount%% *} ro, a write there fails"
}

# MemoryMax= is enforced by the memory controller of the service's cgroup: the limit must be in
# the cgroup's own file, cgroup v2's memory.max or v1's memory.limit_in_bytes. A container whose
# host does not delegate the controller has no such cgroup: nothing to read, so no verdict.
check_memory_max() {
    local pid expected cgroups v1 v2 file limit
    pid=$(prop MainPID) expected=$(prop MemoryMax)
    cgroups=$(ct cat "/proc/$pid/cgroup") || { why="cannot read /proc/$pid/cgroup"; return 1; }
    v1=$(sed -n 's/^[0-9]*:memory://p' <<<"$cgroups")
    v2=$(sed -n 's/^0:://p' <<<"$cgroups")
    for file in "/sys/fs/cgroup$v2/memory.max" "/sys/fs/cgroup/unified$v2/memory.max" \
        "/sys/fs/cgroup/memory$v1/memory.limit_in_bytes"; do
        [[ $file == */edged.service/* ]] && limit=$(ct cat "$file" 2>/dev/null) && break
    done
    if [[ -z ${limit:-} ]]; then
        why="the service has no memory cgroup of its own here (v1 memory cgroup '${v1:-none}', no memory.max under the unified '$v2'): the host does not delegate the memory controller to the container, so MemoryMax=$expected cannot take effect"
        return "$CANNOT_TELL"
    fi
    [[ $limit == "$expected" ]] || { why="$file holds $limit, MemoryMax=$expected"; return 1; }
    note="$file = $limit"
}

check_socket_access() {
    local denied
    try "user sensor (group edged) could not infer" \
        ct runuser -u sensor -- "${PYCHECKS[@]}" infer demo --shape 1x16 || return 1
    try "user sensor (group edged) could not infer by shared memory (regions.sock)" \
        ct runuser -u sensor -- "${PYCHECKS[@]}" infer demo --shape 1x16 --region || return 1
    denied=$(ct runuser -u stranger -- "${PYCHECKS[@]}" infer demo --shape 1x16 --expect ACCESS_DENIED) ||
        { why="user stranger (not in group edged): ${denied:-no answer}"; return 1; }
    echo "$denied"
    note="sensor inferred, by frames and by shared memory; stranger got ${denied%%:*}: ${denied#*: }"
}

# reload_refused SINCE PATTERN WHAT: `systemctl reload` must fail, and the reason edgectl gave
# (ExecReload=, its output in edged's journal since SINCE) match PATTERN (grep -E).
reload_refused() {
    if ct systemctl reload edged.service; then why="systemctl reload succeeded with $3"; return 1; fi
    journal "$1" -o cat -t edgectl | grep -E -- "$2" >/dev/null ||
        { why="systemctl reload failed with $3, but edgectl did not say '$2' in the journal"; return 1; }
}

check_reload() {
    local pid code since
    pid=$(prop MainPID)
    try "cannot build the model rows" checks model one-row /etc/edged/models/rows.onnx || return 1
    { ct cat "$WORK/shipped.toml"; printf '\n[models.rows]\npath = "/etc/edged/models/rows.onnx"\n'; } |
        write_file /etc/edged/edged.toml
    try "systemctl reload edged failed for a valid config adding model rows" \
        ct systemctl reload edged.service || return 1
    wait_for 10 "model rows serving version 1 (edgectl models)" serving rows 1 || return 1
    try "model rows does not answer after the reload" checks infer rows --shape 1x8 || return 1
    # Refused: invalid TOML, then a model whose file is missing. Each reload must fail and
    # leave the daemon serving what it served.
    since=$(date +%s.%N)
    printf '[models.rows\npath = \n' | write_file /etc/edged/edged.toml
    reload_refused "$since" 'CONFIG: .*not valid TOML' "invalid TOML" || return 1
    { ct cat "$WORK/shipped.toml"
        printf '\n[models.rows]\npath = "/etc/edged/models/rows.onnx"\n'
        printf '\n[models.ghost]\npath = "/etc/edged/models/missing.onnx"\n'; } |
        write_file /etc/edged/edged.toml
    reload_refused "$since" '"ghost": "LOAD_FAILED: .*no file at' "model ghost's file missing" ||
        return 1
    [[ $(prop ActiveState) == active && $(prop MainPID) == "$pid" ]] ||
        { why="after the refused reloads: $(prop ActiveState), MainPID $(prop MainPID) (was $pid)"; return 1; }
    try "model rows stopped serving after a refused reload" checks infer rows --shape 1x8 || return 1
    code=$(checks infer ghost --shape 1x8 --expect UNKNOWN_MODEL) ||
        { why="model ghost: $code"; return 1; }
    note="rows added and served; refused: invalid TOML (CONFIG), a missing model file (LOAD_FAILED); MainPID $pid kept serving"
}

check_journal_fields() {
    local since=$1 trace found
    trace=boot-test-$RANDOM$RANDOM
    # A wrong shape is refused before admission: the record has no VERSION (docs/OPERATIONS.md).
    try "the wrong-shape request was not refused with SHAPE_MISMATCH" \
        checks infer demo --shape 1x3 --trace "$trace-shape" --expect SHAPE_MISMATCH || return 1
    # A run that fails was admitted to a version: MODEL, VERSION, TRACE_ID and ERROR_CODE.
    try "two rows on model rows did not fail with RUN_FAILED" \
        checks infer rows --shape 2x8 --trace "$trace-run" --expect RUN_FAILED || return 1
    try "no journal record for MODEL=demo TRACE_ID=$trace-shape ERROR_CODE=SHAPE_MISMATCH" \
        wait_for 10 "the SHAPE_MISMATCH record in the journal" \
        journal_has "$since" MODEL=demo TRACE_ID="$trace-shape" ERROR_CODE=SHAPE_MISMATCH || return 1
    try "no journal record for MODEL=rows VERSION=1 TRACE_ID=$trace-run ERROR_CODE=RUN_FAILED" \
        wait_for 10 "the RUN_FAILED record in the journal" \
        journal_has "$since" MODEL=rows VERSION=1 TRACE_ID="$trace-run" ERROR_CODE=RUN_FAILED || return 1
    found=$(journal "$since" -o cat MODEL=rows VERSION=1 TRACE_ID="$trace-run" ERROR_CODE=RUN_FAILED)
    echo "$found"
    note="MODEL=rows VERSION=1 TRACE_ID=$trace-run ERROR_CODE=RUN_FAILED: $(wc -l <<<"$found") record; SHAPE_MISMATCH on demo found by MODEL, TRACE_ID, ERROR_CODE"
}

# The config for the rest: the models rows, ota (v1 from a file; OTA installs v2), slow (on
# its own thread, as usual) and blocking (the same model run on the event loop: inline_max_us
# is so high that every run after the first goes inline); a run is stuck after 1 s; OTA
# installs commit without a health window. And a drop-in with a short WatchdogSec= and
# RestartSec=. [daemon] and [ota] need a restart, which it does.
test_config() {
    try "cannot build the models" ct sh -c "${PYCHECKS[*]} model square /etc/edged/models/ota.onnx --seed 1 &&
        ${PYCHECKS[*]} model slow /etc/edged/models/slow.onnx" || return 1
    {
        ct sed -e '/^\[daemon\]$/a stuck_run_s = 1.0' -e '/^\[ota\]$/a health_window_s = 0' \
            "$WORK/shipped.toml"
        printf '\n[models.rows]\npath = "/etc/edged/models/rows.onnx"\n'
        printf '\n[models.ota]\npath = "/etc/edged/models/ota.onnx"\n'
        printf '\n[models.slow]\npath = "/etc/edged/models/slow.onnx"\n'
        printf '\n[models.blocking]\npath = "/etc/edged/models/slow.onnx"\n'
        printf 'inline_max_us = 1000000000\n'
    } | write_file /etc/edged/edged.toml
    try "the test config does not check" ct edged config check /etc/edged/edged.toml || return 1
    ct mkdir -p /etc/systemd/system/edged.service.d
    printf '[Service]\nWatchdogSec=%ss\nRestartSec=%ss\n' "$WATCHDOG_S" "$RESTART_S" |
        write_file /etc/systemd/system/edged.service.d/boot-test.conf
    ct systemctl daemon-reload
    try "systemctl restart edged failed with the test config" ct systemctl restart edged.service ||
        return 1
    [[ $(prop WatchdogUSec) == "${WATCHDOG_S}s" ]] || { why="WatchdogUSec=$(prop WatchdogUSec)"; return 1; }
    note="drop-in WatchdogSec=${WATCHDOG_S}s RestartSec=${RESTART_S}s; stuck_run_s = 1.0, health_window_s = 0"
}

# A request that outlives the daemon, as a transient unit in the container: no process on this
# side waits for it (see stop_container), and `systemctl stop` ends it.
CLIENTS=0
background_request() {
    CLIENTS=$((CLIENTS + 1))
    client_unit=edged-test-client-$CLIENTS
    ct systemd-run --quiet --collect --unit="$client_unit" -p RuntimeMaxSec=180 \
        "${PYCHECKS[@]}" infer "$@"
}

# Before each restart check: the test's own restarts must not run into the unit's start limit
# (StartLimitBurst=5 in 10 minutes); reset-failed clears it, and NRestarts with it.
fresh_start_limit() { ct systemctl reset-failed edged.service; }

# restarted_after PID RESTARTS: a new main process, active, and NRestarts more than RESTARTS
restarted_after() {
    local pid
    pid=$(prop MainPID)
    [[ $pid != 0 && $pid != "$1" && $(prop ActiveState) == active && $(prop NRestarts) -gt $2 ]]
}

# wait_restart PID RESTARTS WHAT: waits for the watchdog's restart, then checks NRestarts rose by
# one and the new daemon answers; WHAT names the cause in the reason.
wait_restart() {
    wait_for $((WATCHDOG_S + RESTART_S + 60)) "a restart after $3 (WatchdogSec=${WATCHDOG_S}s)" \
        restarted_after "$1" "$2" || return 1
    [[ $(prop NRestarts) == $(($2 + 1)) ]] ||
        { why="NRestarts went from $2 to $(prop NRestarts), not by one"; return 1; }
    try "edgectl status failed after the restart" edgectl status
}

# journal_since SINCE FILE: edged's journal since SINCE into FILE (kept for reading later).
journal_since() { journal "$1" -o cat >"$2" || true; }

# has FILE PATTERN WHAT: FILE has a line matching PATTERN (grep -E), else WHAT is missing.
has() { grep -Eq -- "$2" "$1" || { why="no $3 in the journal (see $1)"; return 1; }; }

# The end of the daemon the watchdog aborted: systemd's words for it (6/ABRT: the fault handler
# dumped the stacks and re-raised the signal).
exit_of() { grep -Eo -m1 'Main process exited, code=[a-z]+, status=[^ ]+' "$1"; }

# The fault handler's dump of every thread: exactly one "Current thread" (the thread that took
# the signal: the main thread when the loop blocked), other threads as "Thread 0x", Python
# frames under each, and the process ending by SIGABRT.
full_stacks() {
    local file=$1 current others
    current=$(grep -c '^Current thread 0x' "$file" || true)
    others=$(grep -c '^Thread 0x' "$file" || true)
    ((current == 1)) ||
        { why="$current 'Current thread 0x' lines (faulthandler) in the journal, not 1 (see $file)"; return 1; }
    ((others >= 1)) || { why="no other thread's stack ('Thread 0x') in the journal (see $file)"; return 1; }
    has "$file" '^  File "' "Python frame ('  File \"...')" || return 1
    has "$file" 'Main process exited, code=(killed|dumped), status=6/ABRT' \
        "'Main process exited, ... status=6/ABRT'" || return 1
    stacks="Current thread + $others other threads' stacks"
}

check_watchdog_hang() {
    local pid restarts since file=$BUILD/systemd-test.watchdog-hang.txt
    fresh_start_limit
    pid=$(prop MainPID) restarts=$(prop NRestarts) since=$(date +%s.%N)
    try "cannot SIGSTOP the main PID $pid" ct kill -STOP "$pid" || return 1
    wait_restart "$pid" "$restarts" "SIGSTOP of MainPID $pid" || return 1
    journal_since "$since" "$file"
    has "$file" "Watchdog timeout" "'Watchdog timeout'" || return 1
    has "$file" "Killing process $pid .* with signal SIGABRT" "'Killing process $pid ... SIGABRT'" ||
        return 1
    # A stopped process takes SIGABRT when systemd's SIGCONT follows, on whichever thread runs
    # first: a thread without Python state dumps the others while they run again, which is not
    # safe (systemd/README.md). The dump is looked for in full by the next two checks.
    has "$file" '^Fatal Python error: Aborted' "fault handler output ('Fatal Python error: Aborted')" ||
        return 1
    note="MainPID $pid -> $(prop MainPID), NRestarts $restarts -> $(prop NRestarts); journal: Watchdog timeout, SIGABRT, fault handler ran ($(grep -c '^Current thread 0x' "$file") 'Current thread', $(grep -c '^Thread 0x' "$file") 'Thread 0x' stacks), $(exit_of "$file")"
}

check_watchdog_blocked_loop() {
    local pid restarts since client_unit stacks file=$BUILD/systemd-test.watchdog-loop.txt
    fresh_start_limit
    # The first run goes to the model's thread (no run time known yet), the next ones inline.
    try "model blocking does not answer" checks infer blocking --shape 1x8 || return 1
    try "model blocking does not answer" checks infer blocking --shape 1x8 || return 1
    pid=$(prop MainPID) restarts=$(prop NRestarts) since=$(date +%s.%N)
    # Minutes of loop iterations on the event loop's thread: no tick, no ping, no log.
    background_request blocking --shape 4000x8 --timeout 150 || { why="cannot start the request"; return 1; }
    wait_restart "$pid" "$restarts" "a model run that blocks the event loop" || return 1
    ct systemctl stop "$client_unit" 2>/dev/null || true
    journal_since "$since" "$file"
    has "$file" "Watchdog timeout" "'Watchdog timeout'" || return 1
    full_stacks "$file" || return 1
    grep -A12 '^Current thread 0x' "$file" | grep 'in _execute' >/dev/null ||
        { why="the Current thread's stack is not in the model run (_execute) (see $file)"; return 1; }
    note="MainPID $pid -> $(prop MainPID), NRestarts $restarts -> $(prop NRestarts); journal: Watchdog timeout, $stacks (the main thread in the model run), $(exit_of "$file")"
}

check_stuck_run() {
    local pid restarts since seen_stuck="" text client_unit stacks file=$BUILD/systemd-test.stuck-run.txt
    fresh_start_limit
    pid=$(prop MainPID) restarts=$(prop NRestarts) since=$(date +%s.%N)
    # Minutes of loop iterations on the model's thread: the loop runs, sees the run stuck after
    # stuck_run_s and stops pinging.
    background_request slow --shape 4000x8 --timeout 150 || { why="cannot start the request"; return 1; }
    local limit=$((WATCHDOG_S + RESTART_S + 60))
    local deadline=$((SECONDS + limit))
    until restarted_after "$pid" "$restarts"; do
        text=$(prop StatusText)
        [[ $text == stuck:* ]] && seen_stuck=$text
        if ((SECONDS >= deadline)); then
            why="no restart within $limit s of a request to the slow model (StatusText: $text)"
            return 1
        fi
        sleep 0.3
    done
    [[ $(prop NRestarts) == $((restarts + 1)) ]] ||
        { why="NRestarts went from $restarts to $(prop NRestarts), not by one"; return 1; }
    try "edgectl status failed after the restart" edgectl status || return 1
    ct systemctl stop "$client_unit" 2>/dev/null || true
    [[ -n $seen_stuck ]] || { why="StatusText never said stuck: before the restart"; return 1; }
    journal_since "$since" "$file"
    has "$file" 'stuck: model slow version 1 has run for .*no longer pinging the watchdog' \
        "'stuck: model slow ... no longer pinging the watchdog'" || return 1
    has "$file" "Watchdog timeout" "'Watchdog timeout'" || return 1
    full_stacks "$file" || return 1
    note="StatusText '$seen_stuck', Watchdog timeout, $stacks, $(exit_of "$file"); MainPID $pid -> $(prop MainPID), NRestarts $restarts -> $(prop NRestarts)"
}

check_ota_inbox() {
    try "ota version 1 does not serve" checks infer ota --shape 1x8 || return 1
    try "cannot make the keys and the signed bundle" ct sh -ec "
        edged keys gen fleet --dir $WORK/keys
        install -m 0644 $WORK/keys/fleet.pub /etc/edged/trusted/fleet.pub
        ${PYCHECKS[*]} model square $WORK/ota-2.onnx --seed 2
        edged bundle build $WORK/ota-2.onnx -o $WORK/ota-2.bundle --name ota --version 2
        edged bundle sign $WORK/ota-2.bundle --key $WORK/keys/fleet.ed25519
        edged bundle verify $WORK/ota-2.bundle --trusted /etc/edged/trusted" || return 1
    # As an OTA agent does: a hidden name while writing, then a rename.
    try "cannot drop the bundle into the inbox" ct sh -ec "
        install -o edged -g edged -m 0600 $WORK/ota-2.bundle /var/lib/edged/inbox/.ota-2.bundle
        mv /var/lib/edged/inbox/.ota-2.bundle /var/lib/edged/inbox/ota-2.bundle" || return 1
    wait_for 60 "model ota serving version 2 (edgectl models)" serving ota 2 || return 1
    wait_for 30 "the bundle in /var/lib/edged/inbox/done/" \
        ct test -e /var/lib/edged/inbox/done/ota-2.bundle || return 1
    edgectl history
    [[ $(edgectl history) == *installed* ]] || { why="edgectl history: $(edgectl history)"; return 1; }
    try "ota version 2 does not answer" checks infer ota --shape 1x8 || return 1
    note="signed ota v2 through the inbox: serving v2, bundle in done/, history says installed"
}

check_fleet_agents() {
    local usage prom status=0
    # Mender's update module: where the client looks, running the venv's edged
    usage=$(ct /usr/share/mender/modules/v3/edged-bundle 2>&1) || status=$?
    [[ $status == 2 && $usage == *"usage: edged-bundle STATE FILES"* ]] ||
        { why="the Mender module did not run: ${usage:-no output}"; return 1; }
    # the textfile timer's service, once, into node_exporter's directory
    try "cannot make node_exporter's textfile directory" \
        ct mkdir -p /var/lib/prometheus/node-exporter || return 1
    try "edged-textfile.service failed" ct systemctl start edged-textfile.service || return 1
    prom=$(ct cat /var/lib/prometheus/node-exporter/edged.prom) ||
        { why="edged-textfile.service wrote no edged.prom"; return 1; }
    echo "$prom" | grep -E '^edged_(up|process_resident)' || true
    ct journalctl -u edged-textfile.service -o cat --no-pager | tail -3
    [[ $prom == *"edged_up 1"* && $prom == *edged_process_resident_memory_bytes* ]] ||
        { why="edged.prom lacks edged_up 1 or the renamed process metrics"; return 1; }
    note="the Mender module runs; edged-textfile.service wrote edged_up 1"
}

# first_record SINCE PATTERN JOURNALCTL-ARGS...: the first journal record since SINCE (epoch
# seconds) matching PATTERN (awk), as "EPOCH.USEC host ident: message"; 1 when there is none.
first_record() {
    local since=$1 pattern=$2
    shift 2
    ct journalctl --no-pager -b -o short-unix --since "@$since" "$@" |
        awk -v pattern="$pattern" '!found && $0 ~ pattern { print; found = 1 } END { exit !found }'
}

admitted_more() { (($(checks requests "$1") > $2)); }
exit_recorded() { [[ -n $(prop ExecMainExitTimestamp) ]]; }
unit_ended() { ! ct systemctl is-active --quiet "$1"; }

# A request runs on the slow model when the stop comes: the drain lets it finish (its client
# gets the result), then the daemon exits 0.
check_stop() {
    local before client_unit shown result stopping started took since after
    try "model slow does not answer" checks infer slow --shape 1x8 || return 1
    before=$(checks requests slow)
    # 100 rows: a few seconds, well within drain_timeout_s (10 s).
    background_request slow --shape 100x8 --timeout 60 || { why="cannot start the request"; return 1; }
    wait_for 20 "the request to slow admitted (edgectl models: requests > $before)" \
        admitted_more slow "$before" || return 1
    started=$SECONDS since=$(date +%s.%N)
    try "systemctl stop edged failed" ct systemctl stop edged.service || return 1
    took=$((SECONDS - started))
    # The exit is recorded when systemd reaps the main process, which may come just after the
    # unit went inactive.
    wait_for 5 "the main process's exit recorded (ExecMainExitTimestamp)" exit_recorded || return 1
    shown=$(ct systemctl show -p ActiveState,Result,ExecMainCode,ExecMainStatus edged.service |
        sort | tr '\n' ' ')
    echo "$shown"
    [[ $shown == "ActiveState=inactive ExecMainCode=1 ExecMainStatus=0 Result=success " ]] ||
        { why="after systemctl stop: $shown(ExecMainCode=1 is exited)"; return 1; }
    wait_for 10 "the client $client_unit to end" unit_ended "$client_unit" || return 1
    stopping=$(first_record "$since" 'stop requested; draining' -u edged.service) ||
        { why="no 'stop requested; draining' in edged's journal"; return 1; }
    result=$(first_record "$since" 'result from slow version' -u "$client_unit") ||
        { why="the request in flight at the stop got no result: $(ct journalctl --no-pager -b -o cat -u "$client_unit" | tail -n1)"; return 1; }
    echo "$stopping"
    echo "$result"
    after=$(awk -v stop="${stopping%% *}" -v done="${result%% *}" 'BEGIN { printf "%d", (done - stop) * 1000 }')
    ((after > 0)) || { why="the result came before the stop began: $result / $stopping"; return 1; }
    note="${shown% }; the request in flight got its result ${after} ms after the stop began (stop took ${took} s)"
}

check_boot_start() {
    power_off || return 1
    boot || return 1
    [[ $(ct systemctl is-enabled edged.service) == enabled ]] || { why="edged is not enabled"; return 1; }
    wait_for 60 "edged active after the boot" is_active || return 1
    try "edgectl status failed after the boot" edgectl status || return 1
    wait_for 10 "model ota serving version 2 after the boot" serving ota 2 || return 1
    note="enabled at install, active after the container's reboot, serving the committed ota v2"
}

check_poweroff() {
    local left
    power_off || return 1
    left=$(mounts_under_root)
    [[ -z $left ]] || { why="mounts left under $ROOT: $left"; return 1; }
    left=$(processes_in_root)
    [[ -z $left ]] || { why="processes left in $ROOT: $left"; return 1; }
    note="nspawn exited; no mount under $ROOT, no process in it"
}

begin "checks"
check start-after-ready check_start_after_ready
check status-text check_status_text
check sandbox check_sandbox
check memory-max check_memory_max
check socket-access check_socket_access
check reload check_reload
check journal-fields check_journal_fields "$(date +%s.%N)"
check test-config test_config
check watchdog-hang check_watchdog_hang
check watchdog-blocked-loop check_watchdog_blocked_loop
check stuck-run check_stuck_run
check ota-inbox check_ota_inbox
check fleet-agents check_fleet_agents
check stop-drains check_stop
finish checks
begin "reboot"
check start-at-boot check_boot_start
finish reboot
begin "poweroff"
check poweroff-clean check_poweroff
finish poweroff

say "summary"
for phase in host debootstrap copy boot install checks reboot poweroff; do
    [[ -n ${took[$phase]:-} ]] && out "$(printf '%-12s %4d s' "$phase" "${took[$phase]}")"
done
out "$(printf '%-12s %4d s' total "$SECONDS")"
if ((${#failures[@]})); then
    out "${#failures[@]} check(s) failed: ${failures[*]} (log: $LOG)"
    exit 1
fi
out "all checks passed (log: $LOG)"
