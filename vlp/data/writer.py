"""Shard writing: items from :mod:`vlp.data.sources` into WebDataset tars, several writer processes at once.

Guarantees:
- a shard appears under its final name only when complete (written as ``.<name>.partial``, fsynced, renamed);
- the manifest (``manifest.json``: samples and bytes per shard, totals, the skip report) is written last, the
  same way, so a folder with a manifest is a finished shard set (:func:`vlp.data.shards.check_complete` says
  what is missing from one without);
- a bad input (unreadable or undecodable image, empty caption, caption line without a comma or not UTF-8) is
  skipped, counted per reason and listed with its file and line in the report; the run goes on;
- writer processes die with the process that started them: a killed writer leaves ``.partial`` files, never
  shards that keep appearing after it is gone;
- an existing shard set is never overwritten unless asked;
- tars are byte-for-byte reproducible (fixed mtime and owner), images are stored as read unless a resize
  is asked for.
"""
from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from vlp.atomic import write_text
from vlp.data.lifetime import die_with_parent
from vlp.data.shards import MANIFEST, written_by_vlp
from vlp.data.sources import Item, Skip

log = logging.getLogger(__name__)

FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
MAX_LISTED_SKIPS = 10_000  # the report keeps counts of everything, and lists up to this many offenders

_writer_pid: int | None = None  # set in pool processes only: the writer they work for


@dataclass
class WriterOptions:
    samples_per_shard: int = 1000
    workers: int = 1
    resize: int | None = None  # shorter side, only ever shrinks; None keeps the bytes as read
    verify: bool = True  # fully decode every image once, so broken files never reach a shard
    name: str = "{index:05d}.tar"  # shard file names; CLIP_benchmark's layout uses "{index}.tar"
    overwrite: bool = False


def _encode_image(path: str, opts: WriterOptions) -> tuple[str, bytes]:
    with open(path, "rb") as f:
        data = f.read()
    if not opts.verify and opts.resize is None:
        ext = Path(path).suffix.lower().lstrip(".").replace("jpeg", "jpg")
        if ext in ("jpg", "png", "webp"):
            return ext, data
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        ext = FORMAT_EXT.get(img.format)
        needs_resize = opts.resize is not None and min(img.size) > opts.resize
        if ext is not None and not needs_resize:
            return ext, data
        if needs_resize:
            scale = opts.resize / min(img.size)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img = img.resize(size, Image.BICUBIC)
        ext = ext or "png"
        out = io.BytesIO()
        if ext == "jpg":
            img.convert("RGB").save(out, "JPEG", quality=95)
        else:
            img.save(out, {"png": "PNG", "webp": "WEBP"}[ext])
        return ext, out.getvalue()


def _image_error(e: Exception) -> str:
    """The reason an image failed, without object reprs: their memory addresses change from run to run and
    mean nothing to the reader of a report."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image format PIL can read"
    text = str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
    return re.sub(r"\s+at 0x[0-9a-fA-F]+", "", text)


def stop_with_writer(writer_pid: int) -> None:
    """Pool initializer: a pool process must not outlive the writer (``kill -9`` gives the writer no chance to
    stop its pool, and an orphan would go on renaming shards into a folder that is no longer being written)."""
    global _writer_pid
    _writer_pid = writer_pid
    die_with_parent(writer_pid)


def exit_if_orphaned() -> None:
    # Checked before every rename as well: a shard must never appear in a folder whose writer is gone.
    if _writer_pid is not None and os.getppid() != _writer_pid:
        os._exit(1)


def _write_shard(task: tuple[int, list[Item], str, WriterOptions]) -> tuple[dict, list[tuple[str, str]]]:
    import webdataset as wds

    index, items, out, opts = task
    name = opts.name.format(index=index)
    final, partial = Path(out) / name, Path(out) / f".{name}.partial"
    skips: list[tuple[str, str]] = []
    count = 0
    with open(partial, "wb") as f:
        with wds.TarWriter(f, encoder=False, mtime=0, user="vlp", group="vlp") as tar:
            for item in items:
                where = f"{item.where}: {item.image}" if item.where else item.image
                try:
                    ext, image = _encode_image(item.image, opts)
                except FileNotFoundError:
                    skips.append(("missing_image", where))
                    continue
                except Exception as e:  # noqa: BLE001 - decoders raise many types; a bad file must not stop the run
                    skips.append(("bad_image", f"{where}: {_image_error(e)}"))
                    continue
                sample = {"__key__": item.key, ext: image,
                          "json": json.dumps(item.meta, ensure_ascii=False, default=str).encode("utf-8")}
                if item.text is not None:
                    sample["txt"] = item.text.encode("utf-8")
                if item.cls is not None:
                    sample["cls"] = str(item.cls).encode()
                tar.write(sample)
                count += 1
        f.flush()
        os.fsync(f.fileno())
    exit_if_orphaned()
    os.replace(partial, final)
    return {"name": name, "samples": count, "bytes": final.stat().st_size}, skips


def check_output(out: Path, opts: WriterOptions) -> None:
    """A finished shard set (with its manifest) is never overwritten unless asked. What a stopped writer left (vlp's
    shards without a manifest) is written again from the start: the writer is deterministic, so the same command
    finishes the set, and nothing finished is lost."""
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("*.tar")) + ([out / MANIFEST] if (out / MANIFEST).exists() else [])
    unfinished = bool(existing) and not (out / MANIFEST).exists() and written_by_vlp(out)
    if existing and not opts.overwrite and not unfinished:
        raise FileExistsError(f"{out} already holds a shard set ({existing[0].name}, ...); "
                              "choose another folder or pass --overwrite")
    if unfinished and not opts.overwrite:
        log.warning("%s holds %d shards of a writer that stopped before its manifest: writing the set again",
                    out, len(existing))
    for stale in list(out.glob(".*.partial")) + (existing if opts.overwrite or unfinished else []):
        stale.unlink()


def write_shards(inputs: Iterable[Item | Skip], out: str | Path, opts: WriterOptions | None = None,
                 source: str | None = None, progress: bool = True) -> dict:
    """Write every item into ``out`` and return the manifest (also saved as ``out/manifest.json``)."""
    opts = opts or WriterOptions()
    if opts.samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {opts.samples_per_shard}")
    out = Path(out)
    items, skips = [], []
    for x in inputs:
        (items if isinstance(x, Item) else skips).append(x)
    skips = [(s.reason, s.where) for s in skips]
    keys = Counter(item.key for item in items)
    duplicated = [k for k, n in keys.items() if n > 1]
    if duplicated:
        raise ValueError(f"sample keys must be unique within a shard set; {len(duplicated)} repeat, "
                         f"e.g. {duplicated[0]!r}")
    check_output(out, opts)

    n = opts.samples_per_shard
    tasks = [(i, items[s:s + n], str(out), opts) for i, s in enumerate(range(0, len(items), n))]
    start = time.time()
    records = []
    bar = tqdm(total=len(items), unit="sample", desc=f"shards -> {out}", disable=not progress)
    if opts.workers > 1 and len(tasks) > 1:
        # fork where prctl exists: the pool processes are then children of this process itself (not of a fork
        # server), which is what both of stop_with_writer's checks rely on.
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
        with ProcessPoolExecutor(opts.workers, mp_context=context, initializer=stop_with_writer,
                                 initargs=(os.getpid(),)) as pool:
            for record, bad in pool.map(_write_shard, tasks):
                records.append(record)
                skips.extend(bad)
                bar.update(record["samples"] + len(bad))
    else:
        for task in tasks:
            record, bad = _write_shard(task)
            records.append(record)
            skips.extend(bad)
            bar.update(record["samples"] + len(bad))
    bar.close()

    counts = Counter(reason for reason, _ in skips)
    manifest = {
        "format": "vlp-shards/1",
        "source": source,
        "samples": sum(r["samples"] for r in records),
        "bytes": sum(r["bytes"] for r in records),
        "shards": records,
        "skipped": dict(sorted(counts.items())),
        "skipped_items": [{"reason": r, "where": w} for r, w in skips[:MAX_LISTED_SKIPS]],
        "options": {"samples_per_shard": n, "resize": opts.resize, "verify": opts.verify},
        "seconds": round(time.time() - start, 2),
    }
    write_text(out / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False), fsync=True)
    return manifest


def format_report(manifest: dict, out: str | Path) -> str:
    lines = [f"wrote {manifest['samples']:,} samples in {len(manifest['shards'])} shards "
             f"({manifest['bytes'] / 1e6:.1f} MB) to {out} in {manifest['seconds']:.1f}s"]
    if manifest["skipped"]:
        total = sum(manifest["skipped"].values())
        lines.append(f"skipped {total:,}: " + ", ".join(f"{k} {v:,}" for k, v in manifest["skipped"].items()))
        for entry in manifest["skipped_items"][:20]:
            lines.append(f"  {entry['reason']}: {entry['where']}")
        if total > 20:
            lines.append(f"  ... all listed in {Path(out) / MANIFEST}")
    return "\n".join(lines)
