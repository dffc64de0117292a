"""Device health: the real machine's numbers, and a fake Jetson sysfs tree parsed to values."""

from __future__ import annotations

import json
from pathlib import Path

import msgpack

from edged.control.sysinfo import is_jetson, sysinfo

TEGRA_RELEASE = (
    "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
    "DATE: Tue Aug  1 19:57:35 UTC 2023\n"
    "# KERNEL_VARIANT: oot\n"
)
NVPMODEL_CONF = """\
< POWER_MODEL ID=0 NAME=MAXN >
CPU_ONLINE CORE_0 1
< POWER_MODEL ID=1 NAME=10W >
CPU_ONLINE CORE_0 1
< POWER_MODEL ID=2 NAME=15W >
# comment
< PM_CONFIG DEFAULT=2 >
"""


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_jetson(root: Path) -> None:
    write(root, "etc/nv_tegra_release", TEGRA_RELEASE)
    write(root, "proc/device-tree/model", "NVIDIA Jetson AGX Orin Developer Kit\x00")
    write(root, "sys/class/thermal/thermal_zone0/type", "CPU-therm\n")
    write(root, "sys/class/thermal/thermal_zone0/temp", "47531\n")
    write(root, "sys/class/thermal/thermal_zone10/type", "GPU-therm\n")
    write(root, "sys/class/thermal/thermal_zone10/temp", "45000\n")
    write(root, "sys/class/thermal/thermal_zone2/type", "SOC-therm\n")
    (root / "sys/class/thermal/thermal_zone2/temp").mkdir()  # reading it fails, as EINVAL does
    write(root, "sys/devices/gpu.0/load", "473\n")
    write(root, "sys/class/devfreq/17000000.gpu/cur_freq", "918000000\n")
    hwmon = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    write(root, f"{hwmon}/in1_label", "VDD_GPU_SOC\n")
    write(root, f"{hwmon}/in1_input", "5072\n")
    write(root, f"{hwmon}/curr1_input", "1248\n")
    write(root, f"{hwmon}/in2_label", "VDD_CPU_CV\n")
    write(root, f"{hwmon}/in2_input", "5080\n")
    write(root, f"{hwmon}/curr2_input", "400\n")
    write(root, f"{hwmon}/in7_label", "sum of shunt voltages\n")  # no curr7: not a rail
    write(root, f"{hwmon}/in7_input", "40\n")
    write(root, "sys/bus/i2c/drivers/ina3221/1-0041/hwmon/hwmon4/in1_label", "VDD_IN\n")
    write(root, "sys/bus/i2c/drivers/ina3221/1-0041/hwmon/hwmon4/in1_input", "garbage\n")
    write(root, "sys/bus/i2c/drivers/ina3221/1-0041/hwmon/hwmon4/curr1_input", "100\n")
    write(root, "etc/nvpmodel.conf", NVPMODEL_CONF)
    write(root, "var/lib/nvpmodel/status", "pmode:0001 fmode:quiet\n")


def test_the_real_machine_reports_sane_serialisable_values(tmp_path: Path) -> None:
    info = sysinfo([str(tmp_path), str(tmp_path / "missing")])
    json.dumps(info)
    msgpack.packb(info)
    cpu = info["cpu"]
    assert isinstance(cpu["count"], int) and cpu["count"] >= 1
    assert len(cpu["percent"]) == cpu["count"]
    assert all(0.0 <= p <= 100.0 for p in cpu["percent"])
    assert len(cpu["load"]) == 3
    memory = info["memory"]
    assert 0 < memory["available"] <= memory["total"]
    assert 0 <= memory["used"] <= memory["total"]
    assert 0.0 <= memory["percent"] <= 100.0
    assert set(info["swap"]) == {"total", "used", "free", "percent"}
    assert list(info["disks"]) == ["/", str(tmp_path), str(tmp_path / "missing")]
    assert info["disks"]["/"]["total"] > 0
    assert info["disks"][str(tmp_path)]["free"] > 0
    assert info["disks"][str(tmp_path / "missing")] is None
    assert info["boot_time"] < info["time"]
    assert info["uptime"] > 0
    temperatures = info["temperatures"]
    assert temperatures["sensors"] is None or isinstance(temperatures["sensors"], dict)
    for zone in temperatures["thermal_zones"]:
        assert zone["temp_c"] is None or isinstance(zone["temp_c"], float)
    assert (info["jetson"] is None) == (not is_jetson())


def test_a_fake_jetson_tree_is_parsed_to_values(tmp_path: Path) -> None:
    fake_jetson(tmp_path)
    info = sysinfo(root=tmp_path)
    json.dumps(info)
    assert info["temperatures"]["thermal_zones"] == [
        {"zone": "thermal_zone0", "type": "CPU-therm", "temp_c": 47.531},
        {"zone": "thermal_zone2", "type": "SOC-therm", "temp_c": None},
        {"zone": "thermal_zone10", "type": "GPU-therm", "temp_c": 45.0},
    ]
    jetson = info["jetson"]
    assert jetson["model"] == "NVIDIA Jetson AGX Orin Developer Kit"
    assert jetson["l4t"] == {"line": TEGRA_RELEASE.splitlines()[0][2:], "release": "35.4.1"}
    assert jetson["gpu"] == {"load_percent": 47.3, "freq_hz": 918000000}
    assert jetson["rails"] == {
        "VDD_GPU_SOC": {"voltage_mv": 5072, "current_ma": 1248, "power_mw": 5072 * 1248 / 1000},
        "VDD_CPU_CV": {"voltage_mv": 5080, "current_ma": 400, "power_mw": 2032.0},
    }
    assert jetson["nvpmodel"] == {"id": 1, "name": "10W", "source": "status"}


def test_without_a_status_file_nvpmodel_is_the_configured_default(tmp_path: Path) -> None:
    fake_jetson(tmp_path)
    (tmp_path / "var/lib/nvpmodel/status").unlink()
    (tmp_path / "sys/devices/gpu.0/load").unlink()
    write(tmp_path, "sys/devices/platform/gpu.0/load", "1000")
    jetson = sysinfo(root=tmp_path)["jetson"]
    assert jetson["nvpmodel"] == {"id": 2, "name": "15W", "source": "default"}
    assert jetson["gpu"]["load_percent"] == 100.0


def test_missing_files_give_none_not_exceptions(tmp_path: Path) -> None:
    assert sysinfo(root=tmp_path)["jetson"] is None
    assert sysinfo(root=tmp_path)["temperatures"]["thermal_zones"] == []

    for marker in ("etc/nv_tegra_release", "sys/devices/gpu.0", "sys/class/devfreq/57000000.gpu"):
        root = tmp_path / marker.replace("/", "_")
        (root / marker).mkdir(parents=True)  # a directory where a file is expected: unreadable
        assert is_jetson(root)
        jetson = sysinfo(root=root)["jetson"]
        assert jetson["model"] is None
        assert jetson["l4t"] is None
        assert jetson["gpu"] == {"load_percent": None, "freq_hz": None}
        assert jetson["rails"] == {}
        assert jetson["nvpmodel"] is None


def test_unparseable_files_give_none(tmp_path: Path) -> None:
    write(tmp_path, "etc/nv_tegra_release", "not a release line\n")
    write(tmp_path, "sys/devices/gpu.0/load", "busy\n")
    write(tmp_path, "etc/nvpmodel.conf", "nothing useful\n")
    write(tmp_path, "var/lib/nvpmodel/status", "\n")
    write(tmp_path, "sys/class/thermal/thermal_zone0/temp", "\xff\n")
    info = sysinfo(root=tmp_path)
    assert info["temperatures"]["thermal_zones"] == [
        {"zone": "thermal_zone0", "type": None, "temp_c": None}
    ]
    jetson = info["jetson"]
    assert jetson["l4t"] == {"line": "not a release line", "release": None}
    assert jetson["gpu"]["load_percent"] is None
    assert jetson["nvpmodel"] is None
