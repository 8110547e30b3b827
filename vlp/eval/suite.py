"""Suites: a YAML list of (dataset, task, options), validated in full before any model is built, then run.

```yaml
# vlp eval --model vlp-tiny-32:/path/model.safetensors --suite shared
name: shared
data_root: ../../../shared/data      # relative paths below resolve against it; itself relative to this file
datasets:
  cifar10:                            # a name, used in result file names
    format: folder                    # wds | folder | captions | shards | identity (vlp.eval.datasets)
    path: cifar10
    split: test
    templates: cifar10                # registry name (eval/prompts/), inline list, or file
tasks:
  - {dataset: cifar10, task: zeroshot_classification}
  - {dataset: cifar10, task: linear_probe, options: {fewshot_k: 10}}
```
Every error names the suite file and the entry (``datasets.cifar10``, ``tasks[1]``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from vlp.eval.datasets import FORMATS, DatasetError, EvalDataset
from vlp.eval.features import FeatureStore
from vlp.eval.prompts import eval_dir
from vlp.eval.tasks import TASKS, Evaluator, load_all

log = logging.getLogger(__name__)

DATA_ROOT_ENV = "VLP_EVAL_DATA_ROOT"


class SuiteError(ValueError):
    pass


@dataclass
class Entry:
    index: int
    dataset: EvalDataset
    evaluator: Evaluator
    options: dict  # as written in the suite, for the result file

    @property
    def slug(self) -> str:
        return f"{self.dataset.name}__{self.evaluator.task}"


@dataclass
class Suite:
    name: str
    path: Path
    data_root: Path
    datasets: dict[str, EvalDataset]
    entries: list[Entry]
    # the text prefix a model with one encodes texts with (its first kind, captions, when None); the CLI's
    # --text-kind overrides it
    text_kind: str | None = None


def find_suite(name_or_path: str) -> Path:
    """A suite file as given (a ``.yaml`` name or an existing path), else a name in the ``suites/`` folder of the
    eval registry (:func:`vlp.eval.prompts.eval_dir`: the repository's ``eval/``, or its copy in a wheel)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SuiteError(f"suite file {path} does not exist")
        return path
    suites = eval_dir() / "suites"
    found = suites / f"{name_or_path}.yaml"
    if not found.is_file():
        known = sorted(p.stem for p in suites.glob("*.yaml"))
        raise SuiteError(f"no suite {name_or_path!r}: {found} does not exist (known: {known})")
    return found


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,), "None": (type(None),)}


def _allowed(annotation: str) -> tuple[type, ...]:
    kinds: tuple[type, ...] = ()
    for part in str(annotation).split("|"):
        kinds += _TYPES.get(part.strip().split("[")[0], (object,))
    return kinds


def _fits(value, annotation: str) -> bool:
    """Whether a YAML value fits a field annotation such as ``int | None`` or ``list[float]``."""
    allowed = _allowed(annotation)
    if isinstance(value, bool) and bool not in allowed:  # YAML's yes/no must not pass for a number
        return False
    if not isinstance(value, allowed):
        return False
    inner = re.search(r"list\[(\w+)\]", str(annotation))
    if isinstance(value, list) and inner and inner.group(1) in _TYPES:
        return all(_fits(v, inner.group(1)) for v in value)
    return True


def build_options(cls: type, values: dict | None, where: str):
    """A typed options dataclass from a YAML mapping: unknown keys, missing keys and wrong types are errors that
    name the entry. Paths stay strings: each reader resolves them against the suite's data root."""
    if values is not None and not isinstance(values, dict):
        raise SuiteError(f"{where}: expected a mapping, got {type(values).__name__}")
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SuiteError(f"{where}: unknown option(s) {unknown}; known: {sorted(fields)}")
    for name, f in fields.items():
        if name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SuiteError(f"{where}: missing required option {name!r}")
            continue
        if not _fits(values[name], f.type):
            raise SuiteError(f"{where}.{name}: expected {f.type}, got {values[name]!r}")
    return cls(**values)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SuiteError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise SuiteError(f"{path}: expected a mapping with datasets and tasks")
    unknown = sorted(set(data) - {"name", "data_root", "datasets", "tasks", "description", "text_kind"})
    if unknown:
        raise SuiteError(f"{path}: unknown top-level key(s) {unknown}")
    return data


def load_suite(name_or_path: str, data_root: str | Path | None = None) -> Suite:
    """Read and validate a suite: every dataset's files, class names and templates, every task's options. Raises
    :class:`SuiteError` (or :class:`DatasetError`) naming the file and entry; nothing here touches a model."""
    load_all()
    path = find_suite(name_or_path)
    data = _read_yaml(path)
    if data_root is not None or os.environ.get(DATA_ROOT_ENV):  # an override is relative to the working folder
        root = Path(data_root if data_root is not None else os.environ[DATA_ROOT_ENV])
    elif str(data.get("data_root", "")).startswith("builtin:"):  # a set vlp builds from an installed package
        from vlp.data.builtin import builtin_data

        root = builtin_data(str(data["data_root"]).split(":", 1)[1])
    else:
        root = path.parent / str(data.get("data_root") or ".")
    datasets: dict[str, EvalDataset] = {}
    for name, spec in (data.get("datasets") or {}).items():
        where = f"{path}: datasets.{name}"
        if not isinstance(spec, dict) or "format" not in spec:
            raise SuiteError(f"{where}: expected a mapping with a format ({sorted(FORMATS)})")
        spec = dict(spec)
        fmt = spec.pop("format")
        if fmt not in FORMATS:
            raise SuiteError(f"{where}: unknown format {fmt!r}; known: {sorted(FORMATS)}")
        cls = FORMATS[fmt]
        datasets[name] = cls(str(name), build_options(cls.Options, spec, where), where, root)

    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise SuiteError(f"{path}: tasks must be a non-empty list of (dataset, task, options)")
    entries = []
    for i, raw in enumerate(tasks):
        where = f"{path}: tasks[{i}]"
        if not isinstance(raw, dict):
            raise SuiteError(f"{where}: expected a mapping with dataset, task and options")
        where = f"{where} (dataset {raw.get('dataset')!r}, task {raw.get('task')!r})"
        extra = sorted(set(raw) - {"dataset", "task", "options"})
        if extra:
            raise SuiteError(f"{where}: unknown key(s) {extra}; an entry has dataset, task and options")
        if raw.get("task") not in TASKS:
            raise SuiteError(f"{where}: unknown task {raw.get('task')!r}; known: {sorted(TASKS)}")
        if raw.get("dataset") not in datasets:
            raise SuiteError(f"{where}: unknown dataset {raw.get('dataset')!r}; defined: {sorted(datasets)}")
        cls = TASKS[raw["task"]]
        dataset = datasets[raw["dataset"]]
        options = build_options(cls.Options, raw.get("options"), f"{where}.options")
        entries.append(Entry(i, dataset, cls(dataset, options, where), dict(raw.get("options") or {})))

    checked = set()
    for entry in entries:
        try:
            if entry.dataset.name not in checked:
                entry.dataset.check()
                checked.add(entry.dataset.name)
            entry.evaluator.check()
        except DatasetError as e:
            raise SuiteError(str(e)) from e
    text_kind = data.get("text_kind")
    if text_kind is not None and not isinstance(text_kind, str):
        raise SuiteError(f"{path}: text_kind: {text_kind!r} is not a text kind (caption, label, ...)")
    return Suite(str(data.get("name") or path.stem), path, root, datasets, entries, text_kind)


@dataclass
class Result:
    entry: Entry
    metrics: dict
    main_metric: str
    seconds: float

    def as_json(self, model: dict) -> dict:
        e = self.entry
        return {"dataset": e.dataset.name, "task": e.evaluator.task, "model": model.get("model"),
                "pretrained": model.get("pretrained"), "text_kind": model.get("text_kind"), "metrics": self.metrics,
                "main_metric": self.main_metric,
                "protocol": e.evaluator.protocol(), "options": e.options, "data": e.dataset.describe(),
                "prompts": e.dataset.prompt_sources or None, "counts": e.evaluator.counts,
                "dropped": e.dataset.dropped(), "warnings": e.evaluator.warnings, "seconds": round(self.seconds, 3),
                "language": "en"}


def run_suite(suite: Suite, store: FeatureStore) -> list[Result]:
    results = []
    for entry in suite.entries:
        start = time.time()
        log.info("%s: %s on %s", suite.name, entry.evaluator.task, entry.dataset.name)
        metrics = entry.evaluator.run(store)
        for warning in entry.evaluator.warnings:
            log.warning("%s: %s on %s: %s", suite.name, entry.evaluator.task, entry.dataset.name, warning)
        results.append(Result(entry, metrics, entry.evaluator.main_metric(metrics), time.time() - start))
    return results


def run_suite_for_training(model, model_name: str, suite: str, out: Path, batch_size: int = 256,
                           device: str = "cpu") -> dict[str, float]:
    """The trainer's periodic evaluation: a suite on the live model, results written to ``out``; returns the
    main figure of each entry (``<dataset>/<task>/<metric>``) and their unweighted ``average`` for the log. No
    disk cache: the weights change between calls, so features would never be reused."""
    from vlp.eval.features import FeatureOptions
    from vlp.eval.images import LoadOptions
    from vlp.eval.models import OpenClipModel
    from vlp.eval.report import unweighted_average, write_results

    loaded = load_suite(suite)
    wrapped = OpenClipModel(model, model_name, {"model": model_name, "pretrained": "training"}, str(device),
                            text_kind=loaded.text_kind)
    store = FeatureStore(wrapped, FeatureOptions(load=LoadOptions(batch_size=batch_size, workers=0), progress=False))
    results = run_suite(loaded, store)
    write_results(loaded, results, wrapped.describe, Path(out))
    summary = {f"{r.entry.dataset.name}/{r.entry.evaluator.task}/{r.main_metric}": r.metrics[r.main_metric]
               for r in results}
    summary["average"] = unweighted_average(results)
    return summary
