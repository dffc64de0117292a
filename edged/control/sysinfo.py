"""Device health for an operator: CPU, memory, disks, temperatures and, on a Jetson, the GPU,
power rails and power mode.

Everything comes from psutil and plain sysfs/config files, never a subprocess and never a sleep,
so the control command answers at once even on a busy device. A file that is missing or
unreadable gives None (or is left out); nothing here raises. ``root`` moves every sysfs and
/etc read, so tests can point it at a fake tree.
"""

from __future__ import annotations

import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil

T = TypeVar("T")

_GPU_LOAD = ("sys/devices/gpu.0/load", "sys/devices/platform/gpu.0/load")
_TEGRA_RELEASE = "etc/nv_tegra_release"
_POWER_MODEL = re.compile(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=([^\s>]+)")
_PM_DEFAULT = re.compile(r"<\s*PM_CONFIG\s+DEFAULT=(\d+)")
_PMODE = re.compile(r"pmode:\s*(\d+)")
_L4T = re.compile(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)")
_NUMBER = re.compile(r"(\d+)")


def sysinfo(paths: Sequence[str] = (), root: Path = Path("/")) -> dict[str, Any]:
    """One snapshot, JSON/msgpack-serialisable; ``paths`` are disks to report besides "/".

    Per-CPU percent is measured since the previous call in this process (psutil's
    interval=None), so the very first call reports 0.0 for every CPU.
    """
    boot = _safe(psutil.boot_time)
    return {
        "time": time.time(),
        "machine": platform.machine(),
        "cpu": {
            "count": psutil.cpu_count(),
            "percent": _safe(lambda: [float(p) for p in psutil.cpu_percent(percpu=True)]),
            "load": _safe(lambda: [float(x) for x in os.getloadavg()]),
        },
        "memory": _safe(_memory),
        "swap": _safe(_swap),
        "disks": {path: _disk(path) for path in dict.fromkeys(["/", *paths])},
        "boot_time": boot,
        "uptime": None if boot is None else max(0.0, time.time() - boot),
        "temperatures": {"sensors": _sensors(), "thermal_zones": thermal_zones(root)},
        "jetson": jetson(root) if is_jetson(root) else None,
    }


def thermal_zones(root: Path = Path("/")) -> list[dict[str, Any]]:
    """The kernel's own thermal zones: on a Jetson the only temperatures psutil may miss."""
    zones = []
    for zone in _sorted_glob(root / "sys/class/thermal", "thermal_zone*"):
        millis = _read_int(zone / "temp")
        zones.append(
            {
                "zone": zone.name,
                "type": _read(zone / "type"),
                "temp_c": None if millis is None else millis / 1000,
            }
        )
    return zones


def is_jetson(root: Path = Path("/")) -> bool:
    """An L4T release file, the integrated GPU's sysfs node, or a GPU devfreq device."""
    markers = (root / _TEGRA_RELEASE, root / "sys/devices/gpu.0")
    return any(_exists(p) for p in markers) or bool(_gpu_devfreq(root))


def jetson(root: Path = Path("/")) -> dict[str, Any]:
    """Jetson-only health; each value is None (rails: empty) where the board does not have it."""
    devfreq = _gpu_devfreq(root)
    return {
        "model": _read(root / "proc/device-tree/model"),
        "l4t": l4t_release(root),
        "gpu": {
            "load_percent": _gpu_load(root),
            "freq_hz": _read_int(devfreq[0] / "cur_freq") if devfreq else None,
        },
        "rails": power_rails(root),
        "nvpmodel": nvpmodel(root),
    }


def l4t_release(root: Path = Path("/")) -> dict[str, Any] | None:
    """The first line of /etc/nv_tegra_release and the release it names ("35.4.1")."""
    text = _read(root / _TEGRA_RELEASE)
    if not text:
        return None
    line = text.splitlines()[0].lstrip("# ").strip()
    match = _L4T.search(line)
    return {"line": line, "release": f"{match[1]}.{match[2]}" if match else None}


def power_rails(root: Path = Path("/")) -> dict[str, dict[str, Any]]:
    """INA3221 channels by label: voltage (mV) times current (mA) gives the rail's power."""
    rails: dict[str, dict[str, Any]] = {}
    for device in _sorted_glob(root / "sys/bus/i2c/drivers/ina3221", "*"):
        for hwmon in _sorted_glob(device / "hwmon", "hwmon*"):
            for label_file in _sorted_glob(hwmon, "in*_label"):
                channel = label_file.name[2 : -len("_label")]
                label = _read(label_file)
                millivolts = _read_int(hwmon / f"in{channel}_input")
                milliamps = _read_int(hwmon / f"curr{channel}_input")
                if not label or millivolts is None or milliamps is None:
                    continue  # a disabled channel, or the "sum of shunt voltages" pseudo-rail
                key = label if label not in rails else f"{label}@{device.name}"
                rails[key] = {
                    "voltage_mv": millivolts,
                    "current_ma": milliamps,
                    "power_mw": millivolts * milliamps / 1000,
                }
    return rails


def nvpmodel(root: Path = Path("/")) -> dict[str, Any] | None:
    """The power mode nvpmodel last set (its status file), else the configured default."""
    conf = _read(root / "etc/nvpmodel.conf")
    status = _read(root / "var/lib/nvpmodel/status")
    names = {int(i): name for i, name in _POWER_MODEL.findall(conf or "")}
    mode: int | None = None
    source = None
    if status and (match := _PMODE.search(status)):
        mode, source = int(match[1]), "status"
    elif conf and (match := _PM_DEFAULT.search(conf)):
        mode, source = int(match[1]), "default"
    if mode is None:
        return None
    return {"id": mode, "name": names.get(mode), "source": source}


def _gpu_load(root: Path) -> float | None:
    for relative in _GPU_LOAD:
        tenths = _read_int(root / relative)
        if tenths is not None:
            return tenths / 10
    return None


def _gpu_devfreq(root: Path) -> list[Path]:
    return _sorted_glob(root / "sys/class/devfreq", "*gpu*")


def _memory() -> dict[str, Any]:
    mem = psutil.virtual_memory()
    return {
        "total": mem.total,
        "available": mem.available,
        "used": mem.used,
        "percent": float(mem.percent),
    }


def _swap() -> dict[str, Any]:
    swap = psutil.swap_memory()
    return {"total": swap.total, "used": swap.used, "free": swap.free, "percent": swap.percent}


def _disk(path: str) -> dict[str, Any] | None:
    usage = _safe(lambda: psutil.disk_usage(path))
    if usage is None:
        return None
    return {
        "total": usage.total,
        "used": usage.used,
        "free": usage.free,
        "percent": float(usage.percent),
    }


def _sensors() -> dict[str, list[dict[str, Any]]] | None:
    """psutil's temperatures; None where this platform's psutil has no sensors at all."""
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return None
    found = _safe(read)
    if found is None:
        return None
    return {
        chip: [
            {"label": t.label, "current": t.current, "high": t.high, "critical": t.critical}
            for t in readings
        ]
        for chip, readings in found.items()
    }


def _safe(get: Callable[[], T]) -> T | None:
    """psutil raises OSError (or its own errors) where /proc is unusual: report None instead."""
    try:
        return get()
    except (OSError, psutil.Error, RuntimeError, ValueError):
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip("\x00\n\t ")
    except (OSError, ValueError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text.split()[0]) if text else None
    except ValueError:
        return None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _sorted_glob(directory: Path, pattern: str) -> list[Path]:
    """In natural order (thermal_zone2 before thermal_zone10); [] where it cannot be listed."""
    try:
        found = list(directory.glob(pattern))
    except OSError:
        return []
    return sorted(found, key=_natural)


def _natural(path: Path) -> list[str | int]:
    """Splitting on digit runs puts text at even and numbers at odd places: always comparable."""
    return [int(part) if i % 2 else part for i, part in enumerate(_NUMBER.split(path.name))]
