"""The score table: what ``vlp score`` writes and ``vlp filter`` reads.

A scores folder holds, per pool shard, ``<stem>.parquet`` with one row per sample of the shard, in shard order, with
the columns of :data:`SCHEMA`; optionally ``<stem>.image.npy`` and ``<stem>.text.npy`` (float16, one L2-normalised
embedding per row in the same order, NaN rows where the sample could not be scored); ``eval/<dataset>.npy`` (float16,
the image embeddings of evaluation sets, for removing their near-duplicates from a pool); and ``manifest.json``,
written last, listing every shard's table (so a folder with a manifest is a finished scoring run).
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

MANIFEST = "manifest.json"
FORMAT = "vlp-scores/1"

SCHEMA = pa.schema([
    ("uid", pa.string()),            # the sample's json["uid"] (DataComp: 32 hex digits)
    ("key", pa.string()),            # the sample's __key__ in its shard
    ("shard", pa.string()),          # the pool shard's URL or path, as given
    ("index", pa.int32()),           # position of the sample in its shard
    ("score", pa.float32()),         # cosine of the image and text embeddings (not x100); null when not scored
    ("caption_chars", pa.int32()),   # null without a caption
    ("caption_words", pa.int32()),
    ("width", pa.int32()),           # image size as stored; null when the image cannot be read
    ("height", pa.int32()),
    ("error", pa.string()),          # why the sample has no score (null when scored)
])


class ScoresError(ValueError):
    pass


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a finished scoring run; an error naming the folder if scoring has not finished there."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise ScoresError(f"{folder}: no {MANIFEST}: not a finished 'vlp score' output (run or resume vlp score)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ScoresError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def tables(folder: str | Path) -> list[Path]:
    """The per-shard tables of a finished scoring run, in pool order."""
    manifest = read_manifest(folder)
    return [Path(folder) / s["table"] for s in manifest["shards"]]
