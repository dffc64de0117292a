"""The import arrows point down (docs/DESIGN.md): a room imports only from its own layer or
the layers below it, so the wire format never learns about sockets, models never learn about
the services that call them, and clients never pull in the daemon. Lazy imports inside
functions and ``TYPE_CHECKING`` imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edged"

#: lowest first; a module belongs to the first entry whose prefix names it or a package above it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "basics",
        (
            "edged",
            "edged.errors",
            "edged.faults",
            "edged.config",
            "edged.logsetup",
            "edged.protocol",
            "edged.paths",
            "edged.lockfile",
            "edged.sdnotify",
            "edged.store",
            "edged.zmqio",
            "edged.tasks",
            "edged.replies",
            "edged.requests",
            "edged.opunit",
            "edged.demo",
            "edged.tinyllama",
            "edged.tinybert",
            "edged.steps",
        ),
    ),
    (
        "client",
        (
            "edged.reach",
            "edged.shm",
            "edged.client",
            "edged.vectors",
            "edged.pushing",
            "edged.textfile",
            "edged.testing",
        ),
    ),
    ("models", ("edged.models", "edged.drift")),
    (
        "serving",
        (
            "edged.service",
            "edged.chains",
            "edged.regions",
            "edged.ops",
            "edged.server",
            "edged.ota",
            "edged.heap",
            "edged.watchdog",
            "edged.http",
            "edged.collections",
        ),
    ),
    ("operations", ("edged.control",)),
    ("lifecycle", ("edged.daemon",)),
    ("entry points", ("edged.cli", "edged.edgectl", "edged.mender_module", "edged.__main__")),
]
#: what the client side may import: a sensor process never loads the daemon's code
CLIENT_MAY_IMPORT = {"basics", "client"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of ``module``: the most specific entry that names it or a package above it."""
    best: tuple[int, int] | None = None  # (specificity, layer)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if prefix == "edged" and module != "edged":
                    continue  # the package itself, not everything in it
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), index)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def imports(path: Path) -> set[str]:
    """The edged modules ``path`` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "edged":  # from edged import protocol: a submodule, or a name
                found.update(_submodule_or_package(alias.name) for alias in node.names)
            elif node.module.startswith("edged."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "edged")
    return found


def _submodule_or_package(name: str) -> str:
    is_module = (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name).is_dir()
    return f"edged.{name}" if is_module else "edged"


def test_every_import_points_down_or_sideways() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        here = layer_of(module)
        for target in sorted(imports(path)):
            there = layer_of(target)
            name = LAYERS[here][0]
            if there > here or (name == "client" and LAYERS[there][0] not in CLIENT_MAY_IMPORT):
                upward.append(f"{module} ({name}) imports {target} ({LAYERS[there][0]})")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: an import from a lower layer to a higher one is found."""
    bad = tmp_path / "protocol.py"
    bad.write_text("def f():\n    from edged.daemon import Daemon\n")
    assert imports(bad) == {"edged.daemon"}
    assert layer_of("edged.daemon") > layer_of("edged.protocol")
    assert layer_of("edged.models.runner") == layer_of("edged.models")
