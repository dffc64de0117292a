"""Which models are being served: name -> the runner of its active version."""

from __future__ import annotations

from collections.abc import Iterator

from edged.errors import UnknownModel
from edged.models.runner import ModelRunner


class Registry:
    def __init__(self) -> None:
        self._runners: dict[str, ModelRunner] = {}

    def add(self, runner: ModelRunner) -> None:
        self._runners[runner.name] = runner

    def get(self, name: str, version: int | None = None) -> ModelRunner:
        runner = self._runners.get(name)
        if runner is None:
            known = ", ".join(sorted(self._runners)) or "none"
            raise UnknownModel(f"no model named {name!r}; serving: {known}")
        if version is not None and version != runner.version:
            raise UnknownModel(
                f"model {name!r} has no version {version} loaded; serving {runner.version}"
            )
        return runner

    def __iter__(self) -> Iterator[ModelRunner]:
        return iter(list(self._runners.values()))

    def __len__(self) -> int:
        return len(self._runners)
