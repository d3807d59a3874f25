"""A planned run and its outcome: what ``cilab reproduce`` plans, executors run and reports read.

Kept apart from :mod:`cilab.studyplan` (which plans them) and :mod:`cilab.executors`
(which runs them) so that both can use them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config


@dataclass
class RunSpec:
    """One run of a group, fully resolved; all :func:`cilab.reproduce.run_one` needs."""

    group: str
    name: str  # <preset>[-<tag>]-s<seed>: the folder's name
    variant: str  # <preset>[-<tag>]
    preset: str
    seed: int
    overrides: list[str]  # everything applied on top of the preset, seed=... last; stored in metrics.json
    cfg: Config
    folder: Path
    action: str = "new"  # new | resume | skip | overwrite | copy | evaluate
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (override, why) left out of this run
    # action "copy": the identical run of another group, trained instead; "evaluate": the run
    # that trains alike, whose checkpoints this one evaluates with its own classifiers
    source: RunSpec | None = None
    # (copy, evaluate) the plan found another config's run there and --overwrite lets it go; otherwise a
    # complete run found there when the copy or evaluation starts was written after the plan, and stays
    replaces: bool = False

    @property
    def notes(self) -> list[str]:
        return [f"{o} not applied to {self.name}: {why}" for o, why in self.dropped]

    @property
    def label(self) -> str:
        return f"{self.group}/{self.name}"


@dataclass
class RunResult:
    spec: RunSpec
    status: str  # skipped | done | resumed | copied | evaluated | failed
    seconds: float = 0.0
    error: str | None = None
    metrics: dict | None = None

    @property
    def failed(self) -> bool:
        return self.status == "failed"
