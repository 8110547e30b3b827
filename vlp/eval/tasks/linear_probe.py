"""Linear probe on frozen image features, on CPU: multinomial logistic regression (L-BFGS, scikit-learn).

As in the CLIP paper (sec. 3.2 / appendix A.3), the L2 penalty is chosen on a validation split held out from the
training split, then the probe is refitted with it and scored once on the test split. Features are L2-normalised
(CLIP_benchmark's default). The penalty is given as a weight decay ``wd`` on the mean loss,
``mean CE + wd/2 * |W|^2``, which is scikit-learn's ``C = 1 / (wd * n)``, so one grid means the same at any
training-set size. A chosen value at either end of the grid (``weight_decay_at_grid_edge``: ``smallest`` or
``largest``) may not be the best one: the result carries a warning suggesting to extend the grid that way.
"""
from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from vlp.eval.datasets import DatasetError
from vlp.eval.features import FeatureStore
from vlp.eval.metrics import classification_metrics
from vlp.eval.tasks import Evaluator, register_task
from vlp.eval.tasks.classification import labels_of


def split_per_class(labels: list[int], fraction: float, rng: random.Random) -> tuple[list[int], list[int]]:
    """(kept, held out) indices: ``fraction`` of each class held out (at least one where a class has two)."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    kept, held = [], []
    for label in sorted(by_class):
        members = by_class[label][:]
        rng.shuffle(members)
        n = min(len(members) - 1, max(1, round(fraction * len(members)))) if fraction > 0 else 0
        held.extend(members[:n])
        kept.extend(members[n:])
    return sorted(kept), sorted(held)


def take_per_class(indices: list[int], labels: list[int], k: int, rng: random.Random) -> list[int]:
    by_class: dict[int, list[int]] = {}
    for i in indices:
        by_class.setdefault(labels[i], []).append(i)
    chosen = []
    for label in sorted(by_class):
        members = by_class[label][:]
        rng.shuffle(members)
        chosen.extend(members[:k])
    return sorted(chosen)


def fit(x: np.ndarray, y: np.ndarray, wd: float, max_iter: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    probe = LogisticRegression(C=1.0 / (wd * len(y)), max_iter=max_iter)
    # BLAS threads follow torch's setting (``vlp eval --threads``): OpenBLAS's default of one thread per core made
    # an 800-image probe 50x slower on a busy 2-core machine, its threads spinning while others held the cores.
    with warnings.catch_warnings(), threadpool_limits(torch.get_num_threads()):
        warnings.simplefilter("ignore", ConvergenceWarning)  # a capped run is still a valid point of the sweep
        return probe.fit(x, y)


def scores(probe, x: np.ndarray, classes: int) -> torch.Tensor:
    """(n, classes) decision values; classes the probe never saw get -inf, so they are never predicted."""
    raw = probe.decision_function(x)
    if raw.ndim == 1:  # scikit-learn's binary case: one column for the positive class
        raw = np.stack([-raw, raw], axis=1) / 2
    out = torch.full((len(x), classes), -math.inf, dtype=torch.float64)
    out[:, torch.as_tensor(probe.classes_, dtype=torch.long)] = torch.from_numpy(raw)
    return out


def grid_edge(chosen: float, grid: list[float]) -> str | None:
    """"smallest" or "largest" when ``chosen`` is that end of a grid of several values, else None."""
    if len(set(grid)) < 2:
        return None  # one value: nothing was chosen
    return "smallest" if chosen == min(grid) else "largest" if chosen == max(grid) else None


@register_task("linear_probe")
class LinearProbe(Evaluator):
    needs = ("classification",)

    @dataclass
    class Options:
        train_split: str = "train"
        val_proportion: float = 0.2
        fewshot_k: int | None = None  # training images per class; None: all of them
        weight_decays: list[float] = field(default_factory=lambda: [10.0 ** e for e in range(-6, 1)])
        max_iter: int = 1000
        seed: int = 0

    def check(self) -> None:
        super().check()
        o = self.options
        if not 0 < o.val_proportion < 1:
            raise DatasetError(f"{self.where}: val_proportion must lie in (0, 1), got {o.val_proportion}")
        if o.fewshot_k is not None and o.fewshot_k < 1:
            raise DatasetError(f"{self.where}: fewshot_k must be >= 1, got {o.fewshot_k}")
        if not o.weight_decays or any(wd <= 0 for wd in o.weight_decays):
            raise DatasetError(f"{self.where}: weight_decays must be positive numbers")
        if not self.dataset.classnames:
            raise DatasetError(f"{self.where}: dataset {self.dataset.name!r} has no class names")
        self.dataset.image_set(o.train_split)  # fails here, naming the folder, when the split is missing

    def run(self, store: FeatureStore) -> dict[str, float]:
        o, classes = self.options, len(self.dataset.classnames)
        train = store.images(self.dataset.image_set(o.train_split))
        test = store.images(self.dataset.image_set())
        x = F.normalize(train.features, dim=-1).double().numpy()
        y = labels_of(train.records, classes, self.where).tolist()
        x_test = F.normalize(test.features, dim=-1).double().numpy()
        y_test = labels_of(test.records, classes, self.where)

        rng = random.Random(o.seed)
        fit_idx, val_idx = split_per_class(y, o.val_proportion, rng)
        if o.fewshot_k is not None:
            fit_idx = take_per_class(fit_idx, y, o.fewshot_k, rng)
        y_np = np.asarray(y)
        best_wd, best_acc = None, -1.0
        for wd in sorted(o.weight_decays, reverse=True):  # on equal validation accuracy, keep the stronger penalty
            probe = fit(x[fit_idx], y_np[fit_idx], wd, o.max_iter)
            acc = classification_metrics(scores(probe, x[val_idx], classes), torch.as_tensor(y_np[val_idx]))["acc1"]
            if acc > best_acc:
                best_wd, best_acc = wd, acc
        final_idx = fit_idx if o.fewshot_k is not None else sorted(fit_idx + val_idx)
        probe = fit(x[final_idx], y_np[final_idx], best_wd, o.max_iter)
        metrics = classification_metrics(scores(probe, x_test, classes), y_test)
        self.counts = {"images": len(y_test), "train_images": len(final_idx), "classes": classes}
        edge = grid_edge(best_wd, o.weight_decays)
        beyond = "smaller" if edge == "smallest" else "larger"
        self.warnings = [f"the chosen weight decay {best_wd:g} is the {edge} of weight_decays "
                         f"{sorted(o.weight_decays)}: the best may lie beyond it, add {beyond} values"] if edge else []
        return {**metrics, "weight_decay": best_wd, "weight_decay_at_grid_edge": edge, "val_acc1": best_acc,
                "train_images": len(final_idx), "test_images": len(y_test)}

    def main_metric(self, metrics: dict[str, float]) -> str:
        return "acc1"

    def protocol(self) -> str | None:
        shots = f"{self.options.fewshot_k}-shot" if self.options.fewshot_k else "full training split"
        held_out = self.options.val_proportion
        return f"logistic regression, {shots}, weight decay chosen on a {held_out:g} validation split"
