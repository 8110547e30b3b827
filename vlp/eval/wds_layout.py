"""CLIP_benchmark's WebDataset layout for evaluation sets: reading its side files and writing it with vlp.data.

Layout (CLIP_benchmark ``datasets/builder.py: build_wds_dataset``)::

    <root>/<split>/nshards.txt        number of shards N
    <root>/<split>/{0..N-1}.tar       samples: image (jpg/png/webp) + cls (classification) or txt (retrieval)
    <root>/classnames.txt             one class name per line, in label order
    <root>/zeroshot_classification_templates.txt   one template per line, {c} for the class name
    <root>/dataset_type.txt           "classification" (default when absent) or "retrieval"

A retrieval sample's ``txt`` holds all captions of its image, one per line.
"""
from __future__ import annotations

import tarfile
from pathlib import Path

from vlp.data import WriterOptions, write_shards
from vlp.data.sources import Item, caption_file, labelled_folder

NSHARDS = "nshards.txt"
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
DATASET_TYPE = "dataset_type.txt"


def shard_paths(root: Path, split: str) -> list[Path]:
    """The split's shards as ``nshards.txt`` announces them; raises naming the missing file."""
    count_file = root / split / NSHARDS
    if not count_file.exists():
        raise FileNotFoundError(f"{count_file} does not exist (CLIP_benchmark wds layout: <root>/<split>/{NSHARDS})")
    try:
        n = int(count_file.read_text().strip())
    except ValueError as e:
        raise ValueError(f"{count_file}: expected a shard count, got {count_file.read_text()[:40]!r}") from e
    paths = [root / split / f"{i}.tar" for i in range(n)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{count_file} announces {n} shards but {missing[0]} does not exist")
    return paths


def dataset_type(root: Path) -> str:
    path = root / DATASET_TYPE
    kind = path.read_text().strip().lower() if path.exists() else "classification"
    if kind not in ("classification", "retrieval"):
        raise ValueError(f"{path}: dataset type {kind!r} is not supported (classification, retrieval)")
    return kind


def scan_labels(path: Path) -> list[int]:
    """The ``cls`` values of one tar, read from its headers and the tiny cls members only (no image bytes):
    fast enough to check class names against labels before any model work. Falls back to :mod:`tarfile` for
    headers this plain ustar reader does not handle (GNU long names, pax)."""
    labels: list[int] = []
    with open(path, "rb") as f:
        while True:
            header = f.read(512)
            if len(header) < 512 or header == b"\0" * 512:
                return labels
            kind = header[156:157]
            if kind in (b"L", b"K", b"x", b"g"):
                return _scan_labels_tarfile(path)
            name = header[:100].split(b"\0", 1)[0]
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            padded = size + (-size) % 512
            if name.endswith(b".cls") and kind in (b"0", b"\0"):
                labels.append(int(f.read(size)))
                f.seek(padded - size, 1)
            else:
                f.seek(padded, 1)


def _scan_labels_tarfile(path: Path) -> list[int]:
    with tarfile.open(path) as tf:
        return [int(tf.extractfile(m).read()) for m in tf if m.isfile() and m.name.endswith(".cls")]


def _write_side_files(root: Path, split: str, manifest: dict, kind: str,
                      classnames: list[str] | None, templates: list[str] | None) -> None:
    (root / split / NSHARDS).write_text(f"{len(manifest['shards'])}\n")
    (root / DATASET_TYPE).write_text(f"{kind}\n")
    if classnames:
        (root / CLASSNAMES).write_text("\n".join(classnames) + "\n")
    if templates:
        (root / TEMPLATES).write_text("\n".join(templates) + "\n")


def write_classification(folder: str | Path, root: str | Path, split: str = "test",
                         classnames: list[str] | None = None, templates: list[str] | None = None,
                         samples_per_shard: int = 2000, workers: int = 1, progress: bool = True) -> dict:
    """An image folder (``<folder>/<class>/<image>``) as a CLIP_benchmark classification set. Class names default
    to the folder names (in label order); images are stored as read."""
    root, folder = Path(root), Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if classnames is not None and len(classnames) != len(names):
        raise ValueError(f"{len(classnames)} class names given for {len(names)} class folders in {folder}")
    opts = WriterOptions(samples_per_shard=samples_per_shard, workers=workers, name="{index}.tar", verify=False)
    manifest = write_shards(labelled_folder(folder, source=root.name), root / split, opts, source=root.name,
                            progress=progress)
    _write_side_files(root, split, manifest, "classification", classnames or names, templates)
    return manifest


def write_retrieval(images: str | Path, captions: str | Path, root: str | Path, split: str = "test",
                    split_file: str | Path | None = None, samples_per_shard: int = 1000, workers: int = 1,
                    progress: bool = True) -> dict:
    """A caption file (Flickr8k layout) as a CLIP_benchmark retrieval set: one sample per image, its ``txt``
    all of its captions, one per line."""
    root = Path(root)

    def per_image():
        for item in caption_file(images, captions, split_file, source=root.name, per_caption=False):
            if isinstance(item, Item):
                item.text = "\n".join(c.replace("\n", " ") for c in item.meta["captions"])
            yield item

    opts = WriterOptions(samples_per_shard=samples_per_shard, workers=workers, name="{index}.tar", verify=False)
    manifest = write_shards(per_image(), root / split, opts, source=root.name, progress=progress)
    _write_side_files(root, split, manifest, "retrieval", None, None)
    return manifest
