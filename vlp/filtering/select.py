"""``vlp filter``: select pairs of a scored pool by rules, into a DataComp uid file and a report.

Rules are AND-composed; each is one of :data:`RULE_FORMS`. ``score_top=F`` follows DataComp's "CLIP score top F"
baseline (``baselines/apply_filter.py``, ``get_threshold``): over ALL scored rows of the pool (before any other rule),
the cut is the score at 0-based position ``int(F * scored)`` of the scores sorted from highest to lowest (the lowest
score when that position is past the end), and every row with ``score >= cut`` passes. Ties at the cut therefore
all pass: the rule keeps ``int(F * scored) + 1`` rows, more when other rows share the cut's score, and the same
selection as DataComp's code on the same scores.

Memory does not grow with the pool except for the kept uids: the cut comes from two streamed reads of the score
column (:mod:`.quantile`), the selection from a third read of the needed columns, batch by batch; samples for the
report are drawn by a seeded bottom-k draw of fixed size. The kept uids are gathered per batch in DataComp's dtype,
16 bytes each, the least any exact uid file can hold; :func:`vlp.filtering.uids.write_uids` then sorts them through an
8-byte index into one sorted copy streamed to disk, so writing briefly holds about 40 bytes per kept uid.

Rows without a score (null or NaN score, or an ``error``) never pass and are counted per reason. A rule's column
that is null (no caption, unreadable size) fails the rule.
"""
from __future__ import annotations

import logging
import math
import operator
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from vlp.atomic import write_text
from vlp.filtering import quantile
from vlp.filtering.table import read_manifest
from vlp.filtering.uids import DTYPE, from_arrow, write_uids

log = logging.getLogger(__name__)

FORMAT = "vlp-filter/1"
BATCH_ROWS = 1 << 16
SIMILARITY_BYTES = 1 << 28  # largest pool-by-eval cosine block held at once, in bytes of float32

OPERATORS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "=": operator.eq}
TABLE_COLUMNS = ("score", "caption_chars", "caption_words", "width", "height")
DERIVED_COLUMNS = ("min_side", "aspect")  # min(width, height), max(width, height) / min(width, height)
RULE_FORMS = (
    "score_top=F         keep the top fraction F (0 < F <= 1) of all scored rows by score (ties at the cut kept)",
    "score OP X          CLIP score (cosine, not x100)",
    "caption_words OP N, caption_chars OP N",
    "width OP N, height OP N, min_side OP N (min of width and height), aspect OP X (longer side / shorter side)",
    "eval_dup<X or eval_dup<=X   drop images whose cosine with any evaluation-set image is >= X (> X with <=)",
    "OP is one of >=, >, <=, <, =",
)
_RULE = re.compile(r"^\s*([A-Za-z_]+)\s*(>=|<=|>|<|=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Rule:
    text: str  # as given
    name: str  # score_top, eval_dup, or a column of TABLE_COLUMNS / DERIVED_COLUMNS
    op: str
    value: float

    def passes(self, values: np.ndarray) -> np.ndarray:
        """Which rows pass, for this rule's column as float64 (NaN, i.e. null, never passes)."""
        with np.errstate(invalid="ignore"):
            return OPERATORS[self.op](values, self.value)


def _rule_error(text: str, why: str) -> ValueError:
    forms = "\n  ".join(RULE_FORMS)
    return ValueError(f"rule {text!r}: {why}; valid forms:\n  {forms}")


def parse_rule(text: str) -> Rule:
    match = _RULE.match(text) if isinstance(text, str) else None
    if match is None:
        raise _rule_error(str(text), "not of the form NAME OP NUMBER")
    name, op, value = match.group(1), match.group(2), float(match.group(3))
    if name == "score_top":
        if op != "=" or not 0 < value <= 1:
            raise _rule_error(text, "score_top takes '=' and a fraction in (0, 1]")
    elif name == "eval_dup":
        if op not in ("<", "<="):
            raise _rule_error(text, "eval_dup takes '<' or '<=' (the cosine below which a pool image is kept)")
    elif name not in TABLE_COLUMNS + DERIVED_COLUMNS:
        raise _rule_error(text, f"unknown name {name!r}")
    return Rule(text, name, op, value)


def _scored(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
    """(score as float32 with NaN for null, whether the row counts as scored)."""
    score = batch.column("score").to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return score, np.isfinite(score) & batch.column("error").is_null().to_numpy(zero_copy_only=False)


def _scored_values(paths: list[Path], desc: str, progress: bool):
    for path in tqdm(paths, desc=desc, unit="table", disable=not progress):
        for batch in pq.ParquetFile(path).iter_batches(BATCH_ROWS, columns=["score", "error"]):
            score, scored = _scored(batch)
            yield score[scored]


class _Draw:
    """A seeded uniform sample of fixed size from a stream (bottom-k of random keys: mergeable, bounded)."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng = size, rng
        self.keys = np.empty(0)
        self.items: list[tuple] = []

    def offer(self, rows: np.ndarray, make) -> None:
        if self.size == 0 or len(rows) == 0:
            return
        keys = self.rng.random(len(rows))
        if len(keys) > self.size:
            best = np.argpartition(keys, self.size)[:self.size]
            keys, rows = keys[best], rows[best]
        keys = np.concatenate([self.keys, keys])
        items = self.items + [make(int(r)) for r in rows]
        order = np.argsort(keys, kind="stable")[:self.size]
        self.keys, self.items = keys[order], [items[i] for i in order]


@dataclass
class _Tally:
    """Counts of one selection pass, per rule in the order given."""
    rules: list[Rule]

    def __post_init__(self):
        self.pool = self.scored = self.kept = 0
        self.alone = [0] * len(self.rules)
        self.dropped = [0] * len(self.rules)
        self.not_scored: dict[str, int] = {}
        self.duplicates: dict[str, int] = {}  # eval set -> scored rows at or above the cosine
        self.duplicates_removed: dict[str, int] = {}  # eval set -> of those, rows that earlier rules had kept


def _resolve_cuts(rules: list[Rule], paths: list[Path], progress: bool) -> dict[int, dict]:
    """The cut of every ``score_top`` rule, by two streamed reads of the score column."""
    tops = [i for i, r in enumerate(rules) if r.name == "score_top"]
    if not tops:
        return {}
    high = quantile.count_high(_scored_values(paths, "scores 1/2 (histogram)", progress))
    scored = int(high.sum())
    positions = {i: min(int(rules[i].value * scored), scored - 1) for i in tops}
    if scored == 0:
        return {i: {"position": None, "cut": None} for i in tops}
    ranks = sorted({scored - 1 - p for p in positions.values()})  # descending position -> ascending rank
    values = dict(zip(ranks, quantile.values_at(_scored_values(paths, "scores 2/2 (cut)", progress), high, ranks)))
    return {i: {"position": positions[i], "cut": float(values[scored - 1 - positions[i]])} for i in tops}


def _eval_sets(scores: Path, manifest: dict) -> dict[str, np.ndarray]:
    sets = {}
    for name, entry in (manifest.get("eval_sets") or {}).items():
        path = scores / entry["file"]
        if not path.exists():
            raise FileNotFoundError(f"{path}: evaluation set {name!r} listed in {scores / 'manifest.json'} is missing")
        sets[name] = np.load(path).astype(np.float32)
        if sets[name].ndim != 2 or sets[name].shape[1] != next(iter(sets.values())).shape[1]:
            raise ValueError(f"{path}: shape {sets[name].shape}, expected (images, dim) with the dim of every other "
                             "evaluation set")
    return sets


def _max_cosines(embeddings: np.ndarray, sets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per evaluation set, each pool embedding's highest cosine with any of its images (inputs L2-normalised)."""
    out = {}
    for name, target in sets.items():
        best = np.full(len(embeddings), -np.inf, dtype=np.float32)
        step = max(1, SIMILARITY_BYTES // (4 * max(1, len(target))))
        for s in range(0, len(embeddings), step):
            block = embeddings[s:s + step] @ target.T
            if block.shape[1]:
                best[s:s + step] = block.max(axis=1)
        out[name] = best
    return out


def _columns(batch: pa.RecordBatch, names: set[str]) -> dict[str, np.ndarray]:
    """The rule columns of a batch as float64 with NaN for null."""
    cols = {}
    for name in names & set(TABLE_COLUMNS):
        cols[name] = batch.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
    if names & set(DERIVED_COLUMNS):
        w = batch.column("width").to_numpy(zero_copy_only=False).astype(np.float64)
        h = batch.column("height").to_numpy(zero_copy_only=False).astype(np.float64)
        short, long = np.minimum(w, h), np.maximum(w, h)
        cols["min_side"] = short
        with np.errstate(divide="ignore", invalid="ignore"):
            cols["aspect"] = long / short
    return cols


def _select(scores: Path, manifest: dict, rules: list[Rule], cuts: dict[int, dict], draws: tuple[_Draw, _Draw],
            plot: dict, progress: bool) -> tuple[_Tally, list[np.ndarray]]:
    """The selection pass: every table batch by batch; returns the counts and the kept uids per batch."""
    tally = _Tally(rules)
    names = {r.name for r in rules} - {"score_top", "eval_dup"}
    if "score_top" in {r.name for r in rules}:
        names.add("score")
    needs_dup = any(r.name == "eval_dup" for r in rules)
    sets = _eval_sets(scores, manifest) if needs_dup else {}
    if needs_dup and not sets:
        raise ValueError(f"{scores}: an eval_dup rule needs evaluation-set embeddings, and the manifest lists none "
                         "(score the pool with evaluation sets given)")
    columns = sorted({"uid", "score", "error"} | (names & set(TABLE_COLUMNS))
                     | ({"width", "height"} if names & set(DERIVED_COLUMNS) else set()))
    # score_top becomes the threshold found for it; with nothing scored its cut is NaN, which nothing passes
    tests = [Rule(r.text, "score", ">=", math.nan if cuts[i]["cut"] is None else cuts[i]["cut"]) if i in cuts else r
             for i, r in enumerate(rules)]
    kept_draw, dropped_draw = draws
    kept_uids: list[np.ndarray] = []
    edges = plot["edges"]
    for t, entry in enumerate(tqdm(manifest["shards"], desc="select", unit="table", disable=not progress)):
        path = scores / entry["table"]
        table = pq.ParquetFile(path)
        rows = table.metadata.num_rows
        if "rows" in entry and rows != entry["rows"]:
            raise ValueError(f"{path}: {rows} rows, the manifest says {entry['rows']} (table changed after scoring?)")
        embeddings = None
        if needs_dup:
            if not entry.get("image_embeddings"):
                raise ValueError(f"{path}: eval_dup needs image embeddings and this table was scored without them")
            embeddings = np.load(scores / entry["image_embeddings"], mmap_mode="r")
            dim = next(iter(sets.values())).shape[1]
            if embeddings.shape != (rows, dim):
                raise ValueError(f"{scores / entry['image_embeddings']}: shape {embeddings.shape}, expected "
                                 f"({rows}, {dim}) (one row per table row, the evaluation sets' width)")
        start = 0
        for batch in table.iter_batches(BATCH_ROWS, columns=columns):
            n = batch.num_rows
            score, scored = _scored(batch)
            tally.pool += n
            tally.scored += int(scored.sum())
            if not scored.all():
                _count_not_scored(batch, score, scored, tally.not_scored)
            cols = _columns(batch, names)
            cols["score"] = score.astype(np.float64)
            cosines = {}
            if embeddings is not None:
                which = np.flatnonzero(scored)
                rows_embedded = np.asarray(embeddings[start:start + n][which], dtype=np.float32)
                if np.isnan(rows_embedded).any():
                    bad = start + int(which[np.isnan(rows_embedded).any(axis=1)][0])
                    raise ValueError(f"{scores / entry['image_embeddings']}: row {bad} has a score but a NaN embedding "
                                     "(embeddings written by another scoring run?)")
                found = _max_cosines(rows_embedded, sets)
                for name, best in found.items():
                    cosines[name] = np.full(n, np.nan)
                    cosines[name][which] = best
                cols["eval_dup"] = np.fmax.reduce(list(cosines.values())) if cosines else np.full(n, np.nan)
            alive = scored.copy()
            first_fail = np.full(n, -1, dtype=np.int16)
            for i, rule in enumerate(rules):
                passed = tests[i].passes(cols[tests[i].name]) & scored
                tally.alone[i] += int(passed.sum())
                if rule.name == "eval_dup":
                    for name, best in cosines.items():
                        duplicate = scored & ~rule.passes(best)
                        tally.duplicates[name] = tally.duplicates.get(name, 0) + int(duplicate.sum())
                        tally.duplicates_removed[name] = (tally.duplicates_removed.get(name, 0)
                                                          + int((duplicate & alive).sum()))
                newly = alive & ~passed
                tally.dropped[i] += int(newly.sum())
                first_fail[newly] = i
                alive &= passed
            tally.kept += int(alive.sum())
            kept_uids.append(from_arrow(batch.column("uid").filter(pa.array(alive)),
                                        f"{path} rows {start}-{start + n}"))
            plot["all"] += np.histogram(score[scored], edges)[0]
            plot["kept"] += np.histogram(score[alive], edges)[0]
            kept_draw.offer(np.flatnonzero(alive), lambda r: (t, start + r, float(score[r]), None))
            dropped_draw.offer(np.flatnonzero(scored & ~alive),
                               lambda r: (t, start + r, float(score[r]), rules[first_fail[r]].text))
            start += n
    return tally, kept_uids


def _count_not_scored(batch: pa.RecordBatch, score: np.ndarray, scored: np.ndarray, counts: dict) -> None:
    missing = pa.array(~scored)
    errors = batch.column("error").filter(missing)
    for entry in pc.value_counts(errors.drop_null()).to_pylist():
        counts[entry["values"]] = counts.get(entry["values"], 0) + entry["counts"]
    unexplained = errors.is_null().to_numpy(zero_copy_only=False)
    if unexplained.any():
        nan = np.isnan(score[~scored][unexplained])
        null = batch.column("score").filter(missing).is_null().to_numpy(zero_copy_only=False)[unexplained]
        for reason, count in (("no_score", int(null.sum())), ("nan_score", int((nan & ~null).sum())),
                              ("infinite_score", int((~nan & ~null).sum()))):
            if count:
                counts[reason] = counts.get(reason, 0) + count


def filter_scores(scores: str | Path, rules: list[str], out: str | Path, samples: int = 24, seed: int = 0,
                  progress: bool = True) -> dict:
    """Select the pairs of a scored pool that pass every rule; write ``out/{uids.npy, report.json, report.md,
    scores.png, samples.md, samples/}`` and return the report. ``report.json`` is written last: a folder holding it
    is complete."""
    from vlp.filtering import report as reporting  # matplotlib and the shard reader load only when writing

    began = time.time()
    scores, out = Path(scores), Path(out)
    if not rules:
        raise _rule_error("", "no rules given (keeping the whole pool needs no filtering)")
    parsed = [parse_rule(r) for r in rules]
    if sum(r.name == "eval_dup" for r in parsed) > 1:
        raise _rule_error(" ".join(rules), "more than one eval_dup rule (give the lowest cosine once)")
    manifest = read_manifest(scores)
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").unlink(missing_ok=True)  # from here until the end, the folder is not a finished selection

    paths = [scores / s["table"] for s in manifest["shards"]]
    cuts = _resolve_cuts(parsed, paths, progress)
    rng = np.random.default_rng(seed)
    draws = (_Draw(samples, rng), _Draw(samples, rng))
    plot = {"edges": np.linspace(-1.0, 1.0, 2001)}
    plot["all"], plot["kept"] = np.zeros(2000, np.int64), np.zeros(2000, np.int64)
    tally, kept_uids = _select(scores, manifest, parsed, cuts, draws, plot, progress)

    report = {
        "format": FORMAT,
        "scores": str(scores),
        "pool": manifest.get("pool"),
        "model": manifest.get("model"),
        "rules": list(rules),
        "pool_rows": tally.pool,
        "scored_rows": tally.scored,
        "not_scored": dict(sorted(tally.not_scored.items())),
        "kept": tally.kept,
        "kept_fraction_of_scored": tally.kept / tally.scored if tally.scored else 0.0,
        "kept_fraction_of_pool": tally.kept / tally.pool if tally.pool else 0.0,
        "per_rule": [_rule_entry(r, i, tally, cuts) for i, r in enumerate(parsed)],
        "eval_sets": {name: {"images": entry.get("images"), "duplicates": tally.duplicates.get(name, 0),
                             "removed": tally.duplicates_removed.get(name, 0)}
                      for name, entry in (manifest.get("eval_sets") or {}).items()
                      if any(r.name == "eval_dup" for r in parsed)},
        "samples": {"requested": samples, "seed": seed},
        "outputs": {"uids": "uids.npy", "report": "report.md", "histogram": "scores.png", "samples": "samples.md"},
    }
    reporting.write_samples(out, draws, manifest, scores, report)
    reporting.write_histogram(out / "scores.png", plot, report)
    uids = np.concatenate(kept_uids) if kept_uids else np.empty(0, dtype=DTYPE)
    del kept_uids
    report["uids_written"] = write_uids(out / "uids.npy", uids)
    del uids
    report["seconds"] = round(time.time() - began, 2)
    write_text(out / "report.md", reporting.markdown(report))
    write_text(out / "report.json", reporting.to_json(report), fsync=True)
    return report


def _rule_entry(rule: Rule, i: int, tally: _Tally, cuts: dict[int, dict]) -> dict:
    entry = {"rule": rule.text, "name": rule.name, "op": rule.op, "value": rule.value,
             "alone_keeps": tally.alone[i], "dropped_in_sequence": tally.dropped[i]}
    if i in cuts:
        entry.update(cuts[i])
    return entry


def format_report(report: dict) -> str:
    from vlp.filtering.report import terminal
    return terminal(report)

