"""What ``vlp filter`` shows a person: the report as Markdown and as a terminal summary, the score histogram with
the cuts marked, and a page of sampled kept and dropped pairs read back from the pool shards.

The sample page exists because counts do not show what a rule removes; it reads each sampled pair from its pool
shard (the table holds the shard and the position), so a pool that has moved since scoring yields a page that says
so rather than a failed selection.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from vlp.atomic import write_bytes, write_text

THUMBNAIL = 96
CAPTION_CHARS = 300


def to_json(report: dict) -> str:
    return json.dumps(report, indent=1, ensure_ascii=False) + "\n"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"


def _rule_rows(report: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for entry in report["per_rule"]:
        note = ""
        if "cut" in entry:
            note = "no scored rows" if entry["cut"] is None else (
                f"cut {entry['cut']:.6g} (position {entry['position']:,} from the top)")
        rows.append((entry["rule"], f"{entry['alone_keeps']:,} ({_pct(entry['alone_keeps'], report['scored_rows'])})",
                     f"{entry['dropped_in_sequence']:,}", note))
    return rows


def terminal(report: dict) -> str:
    lines = [f"kept {report['kept']:,} of {report['scored_rows']:,} scored rows "
             f"({_pct(report['kept'], report['scored_rows'])}; pool {report['pool_rows']:,} rows), "
             f"{report.get('uids_written', report['kept']):,} uids"]
    width = max(len(r[0]) for r in _rule_rows(report))
    lines.append(f"  {'rule':<{width}}  {'alone keeps':>22}  {'drops in order':>14}")
    for rule, alone, dropped, note in _rule_rows(report):
        lines.append(f"  {rule:<{width}}  {alone:>22}  {dropped:>14}  {note}".rstrip())
    if report["not_scored"]:
        lines.append("not scored (never kept): " + ", ".join(f"{k} {v:,}" for k, v in report["not_scored"].items()))
    for name, entry in report["eval_sets"].items():
        lines.append(f"eval set {name}: {entry['duplicates']:,} near-duplicates in the pool, "
                     f"{entry['removed']:,} removed after the earlier rules")
    if "seconds" in report:
        lines.append(f"{report['seconds']:.1f}s")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    lines = ["# Selection", "",
             f"Scores: `{report['scores']}`. Rules (all must pass): " + ", ".join(f"`{r}`" for r in report["rules"]),
             "",
             f"Kept **{report['kept']:,}** of {report['scored_rows']:,} scored rows "
             f"({_pct(report['kept'], report['scored_rows'])}); the pool has {report['pool_rows']:,} rows "
             f"({_pct(report['kept'], report['pool_rows'])} kept). Uid file: `uids.npy` "
             f"({report.get('uids_written', report['kept']):,} distinct uids).", "",
             "| rule | alone keeps (of scored) | dropped, rules applied in order | |", "|---|---:|---:|---|"]
    lines += [f"| `{rule}` | {alone} | {dropped} | {note} |" for rule, alone, dropped, note in _rule_rows(report)]
    if report["not_scored"]:
        lines += ["", "Rows without a score (never kept):", "", "| reason | rows |", "|---|---:|"]
        lines += [f"| {k} | {v:,} |" for k, v in report["not_scored"].items()]
    if report["eval_sets"]:
        lines += ["", "Evaluation-set near-duplicates:", "",
                  "| evaluation set | images | pool rows at or above the cosine | removed after the earlier rules |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['images']} | {v['duplicates']:,} | {v['removed']:,} |"
                  for k, v in report["eval_sets"].items()]
    if report.get("model") or report.get("pool"):
        lines += ["", f"Scored pool `{report.get('pool')}` with `{json.dumps(report.get('model'))}`."]
    lines += ["", "![scores](scores.png)", "", "Sampled pairs: [samples.md](samples.md)", ""]
    return "\n".join(lines)


def write_histogram(path: Path, plot: dict, report: dict) -> None:
    """The scored rows' histogram (and the kept rows'), with each score cut and threshold marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    edges, counts, kept = plot["edges"], plot["all"], plot["kept"]
    fig = Figure(figsize=(7, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    used = np.flatnonzero(counts)
    if len(used):
        lo, hi = max(0, used[0] - 5), min(len(counts), used[-1] + 6)
        ax.stairs(counts[lo:hi], edges[lo:hi + 1], fill=True, alpha=0.35, label="scored")
        ax.stairs(kept[lo:hi], edges[lo:hi + 1], fill=True, alpha=0.6, label="kept")
    lines = [(e["rule"], e["cut"]) for e in report["per_rule"] if e.get("cut") is not None]
    lines += [(e["rule"], e["value"]) for e in report["per_rule"] if e["name"] == "score"]
    for i, (rule, x) in enumerate(lines):
        ax.axvline(x, color=f"C{i + 2}", linestyle="--", label=f"{rule}: {x:.4f}")
    ax.set_xlabel("CLIP score (cosine)")
    ax.set_ylabel("pairs")
    ax.set_title(f"{report['scored_rows']:,} scored, {report['kept']:,} kept")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_bytes(path, buffer.getvalue())


def _read_pair(url: str, index: int, key: str) -> tuple[dict | None, str | None]:
    """The sample at ``index`` of a pool shard, or why it cannot be read."""
    from vlp.data.shards import iter_raw_samples

    problems = []
    found = next(iter(iter_raw_samples(url, start=index, stop=index + 1,
                                       on_error=lambda reason, where: problems.append(f"{reason}: {where}"))), None)
    if found is None:
        return None, "; ".join(problems) or f"the shard has no sample at position {index}"
    if found["__key__"] != key:
        return None, f"position {index} holds key {found['__key__']!r}, the scores say {key!r} (shard rewritten?)"
    return found, None


def _thumbnail(sample: dict) -> bytes:
    from PIL import Image

    from vlp.data.preprocess import IMAGE_KEYS

    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        raise ValueError(f"no image member ({', '.join(IMAGE_KEYS)})")
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        img.thumbnail((THUMBNAIL, THUMBNAIL))
        out = io.BytesIO()
        img.save(out, "JPEG", quality=85)
    return out.getvalue()


def _cell(text: str) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= CAPTION_CHARS else text[:CAPTION_CHARS] + "..."
    return text.replace("|", "\\|").replace("<", "&lt;")


def write_samples(out: Path, draws: tuple, manifest: dict, scores: Path, report: dict) -> None:
    """``samples.md`` and ``samples/*.jpg``: the drawn kept and dropped pairs, read back from the pool shards."""
    folder = out / "samples"
    folder.mkdir(exist_ok=True)
    for stale in list(folder.glob("kept-*.jpg")) + list(folder.glob("dropped-*.jpg")):
        stale.unlink()
    drawn = {"kept": draws[0].items, "dropped": draws[1].items}
    tables: dict[int, dict] = {}
    for t in sorted({item[0] for items in drawn.values() for item in items}):
        path = scores / manifest["shards"][t]["table"]
        tables[t] = pq.read_table(path, columns=["uid", "key", "shard", "index"]).to_pydict()
    unreadable = 0
    lines = ["# Sampled pairs", "",
             f"{len(drawn['kept'])} kept and {len(drawn['dropped'])} dropped pairs (of the scored rows), drawn "
             f"uniformly with seed {report['samples']['seed']}, highest score first. Rules: "
             + ", ".join(f"`{r}`" for r in report["rules"]), ""]
    for kind, items in drawn.items():
        lines += [f"## {kind.capitalize()}", ""]
        if not items:
            lines += ["(none)", ""]
            continue
        lines += ["| image | score | caption | dropped by | uid | shard, position |" if kind == "dropped" else
                  "| image | score | caption | uid | shard, position |",
                  "|---|---:|---|---|---|---|" if kind == "dropped" else "|---|---:|---|---|---|"]
        for n, (t, row, score, dropped_by) in enumerate(sorted(items, key=lambda it: -it[2])):
            meta = {k: v[row] for k, v in tables[t].items()}
            sample, problem = _read_pair(meta["shard"], meta["index"], meta["key"])
            image, caption = "", ""
            if sample is not None:
                caption = _cell(sample.get("txt", b"").decode("utf-8", "replace"))
                try:
                    name = f"{kind}-{n:03d}.jpg"
                    write_bytes(folder / name, _thumbnail(sample))
                    image = f"![{kind} {n}](samples/{name})"
                except Exception as e:  # noqa: BLE001 - decoders raise many types; one bad image must not stop the page
                    problem = f"image not decodable: {type(e).__name__}: {e}"
            if problem:
                unreadable += 1
                caption = f"*pool shard not readable: {_cell(problem)}*"
            cells = [image, f"{score:.4f}", caption] + ([f"`{dropped_by}`"] if kind == "dropped" else [])
            cells += [f"`{meta['uid']}`", f"`{meta['shard']}` {meta['index']}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    report["samples"].update(kept=len(drawn["kept"]), dropped=len(drawn["dropped"]), unreadable=unreadable)
    write_text(out / "samples.md", "\n".join(lines))
