"""Evaluators: one class per task type, one interface, selected by ``task`` in a suite file.

An evaluator gets its dataset and its typed options, validates what it can before any model work (``check``),
and ``run(store)`` returns a flat dict of metrics, embedding through the :class:`FeatureStore` so that embeddings
are shared with the other tasks of the suite. ``run`` also sets ``counts``: how many images, texts and classes
(or identities) the figures were computed on, recorded in every result file, and may add ``warnings``: sentences
about the figures that a reader should see beside them (result file, summary, log). Adding a task is one module
with a registered class.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from vlp.eval.datasets import DatasetError, EvalDataset
from vlp.eval.features import FeatureStore
from vlp.registry import Registry

TASKS: Registry[type["Evaluator"]] = Registry("evaluation task", attribute="task")
register_task = TASKS.register


@dataclass
class NoOptions:
    pass


class Evaluator(ABC):
    task: ClassVar[str]
    needs: ClassVar[tuple[str, ...]]  # dataset kinds this task can use
    Options: ClassVar[type] = NoOptions

    def __init__(self, dataset: EvalDataset, options, where: str):
        self.dataset, self.options, self.where = dataset, options, where
        self.counts: dict[str, int] = {}  # set by run()
        self.warnings: list[str] = []  # set by run()

    def check(self) -> None:
        """Cheap validation after the dataset's own check; raise :class:`DatasetError` naming the entry."""
        if self.dataset.kind not in self.needs:
            raise DatasetError(f"{self.where}: task {self.task!r} needs a {' or '.join(self.needs)} dataset, "
                               f"but {self.dataset.name!r} is a {self.dataset.kind} dataset")

    @abstractmethod
    def run(self, store: FeatureStore) -> dict[str, float]: ...

    @abstractmethod
    def main_metric(self, metrics: dict[str, float]) -> str:
        """The one figure a summary table shows for this entry."""

    def protocol(self) -> str | None:
        """A short statement of the rule behind the figures, printed next to them (None: the standard one)."""
        return None


def load_all() -> None:
    """Import the evaluator modules so that their classes register."""
    from vlp.eval.tasks import classification, linear_probe, person, retrieval  # noqa: F401
