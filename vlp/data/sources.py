"""Raw inputs that become shards: caption files, labelled folders, identity folders, CSV/parquet lists.

Each reader yields :class:`Item` (one future sample: an image file, its text and metadata) or :class:`Skip`
(an input line or file that cannot become a sample, with the reason and where it was found). Image bytes are
read later, by the shard writer's processes.

Text inputs are UTF-8 (a leading byte-order mark is ignored). A line holding bytes that are not UTF-8 is skipped
as ``not_utf8``, like any other bad line: one mis-encoded caption must not cost the rest of the file.
"""
from __future__ import annotations

import csv
import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

INTEGER_FIELDS = {"label", "identity"}
# torchvision's ImageFolder extensions (torchvision.datasets.folder.IMG_EXTENSIONS, restated: importing torchvision
# costs every shard-writing process a second; tests/test_eval_counts.py checks they agree) plus GIF, whose first
# frame PIL decodes: a folder that torchvision or CLIP_benchmark reads whole is read whole here, when writing
# shards and when evaluating.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


@dataclass
class Item:
    key: str  # unique within the shard set
    image: str  # path of the image file
    text: str | None
    meta: dict = field(default_factory=dict)  # becomes the sample's json (uid added by the writer)
    cls: int | None = None
    where: str | None = None  # file:line it came from, so an image that fails later is reported against it


@dataclass
class Skip:
    reason: str
    where: str  # file[:line]


def make_uid(*parts: str) -> str:
    """A stable 128-bit hex uid (DataComp style) from what identifies the sample in its source."""
    return hashlib.md5("\x1f".join(parts).encode("utf-8")).hexdigest()


def _safe_key(text: str) -> str:
    # WebDataset keys end at the first dot of the file name and must not contain '/'.
    return text.replace("/", "_").replace(".", "_")


def _open_text(path: str | Path, newline: str | None = None):
    # surrogateescape keeps undecodable bytes as lone surrogates instead of raising, so the reader can skip the
    # one line that holds them (see _bad_byte) and go on with the next.
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def _bad_byte(text: str) -> str | None:
    """``"byte 0x.. at column N"`` for the first byte of ``text`` that was not UTF-8 (read by :func:`_open_text`)."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")  # fails exactly on the surrogates that stand for undecodable bytes
    except UnicodeEncodeError as e:
        return f"byte 0x{ord(text[e.start]) - 0xDC00:02x} at column {e.start + 1}"
    return None


def scan_folder(folder: Path) -> tuple[list[Path], Counter]:
    """(the image files of a folder, sorted; a count of its other files per suffix)."""
    images, other = [], Counter()
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(path)
        else:
            other[path.suffix.lower() or "(no suffix)"] += 1
    return images, other


def caption_file(
    images: str | Path,
    captions: str | Path,
    split: str | Path | None = None,
    source: str = "captions",
    per_caption: bool = True,
) -> Iterator[Item | Skip]:
    """Images plus a caption file in Flickr8k's layout: header ``image,caption``, then one line per caption,
    the caption being everything after the FIRST comma (unquoted, may contain commas).

    ``per_caption=True`` writes one sample per caption (what open_clip and img2dataset users expect);
    ``False`` writes one sample per image with ``txt`` = its first caption. Either way ``json["captions"]``
    holds every caption of the image, so a stream can draw one per step.
    """
    images, captions = Path(images), Path(captions)
    if not images.is_dir():
        raise FileNotFoundError(f"image folder {images} does not exist")
    wanted = None
    if split is not None:
        wanted = []
        with _open_text(split) as f:
            for lineno, line in enumerate(f, 1):
                bad = _bad_byte(line)
                if bad:
                    yield Skip("not_utf8", f"{split}:{lineno}: {bad}")
                elif line.strip():
                    wanted.append(line.strip())
    by_image: dict[str, list[tuple[int, str]]] = defaultdict(list)
    with _open_text(captions) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if lineno == 1 and line.replace(" ", "").lower().startswith("image,caption"):
                continue
            bad = _bad_byte(line)
            if bad:
                yield Skip("not_utf8", f"{captions}:{lineno}: {bad}")
                continue
            if not line.strip():
                continue
            name, comma, caption = line.partition(",")
            if not comma:
                yield Skip("no_comma", f"{captions}:{lineno}")
                continue
            caption = caption.strip()
            if not caption:
                yield Skip("empty_caption", f"{captions}:{lineno}")
                continue
            by_image[name.strip()].append((lineno, caption))
    names = wanted if wanted is not None else list(by_image)
    for name in names:
        entries = by_image.get(name)
        if not entries:
            yield Skip("no_caption", f"{split or captions}: image {name}")
            continue
        path = images / name
        all_captions = [c for _, c in entries]
        stem = _safe_key(Path(name).stem)
        if per_caption:
            for i, (lineno, caption) in enumerate(entries):
                meta = {"uid": make_uid(source, name, str(i)), "source": source, "kind": "caption",
                        "image": name, "caption_index": i, "captions": all_captions}
                yield Item(f"{stem}_{i}", str(path), caption, meta, where=f"{captions}:{lineno}")
        else:
            meta = {"uid": make_uid(source, name), "source": source, "kind": "caption",
                    "image": name, "captions": all_captions}
            yield Item(stem, str(path), all_captions[0], meta, where=f"{captions}:{entries[0][0]}")


def grouped_images(root: str | Path, group: str, unsupported: Counter | None = None,
                   require_images: bool = False) -> list[tuple[int, str, Path]]:
    """(index of the group folder in sorted order, its name, image path) of ``<root>/<group>/<image>``. Other
    files are counted per suffix into ``unsupported``. ``require_images``: a group folder without an image is an
    error naming it (torchvision's ImageFolder refuses an empty class too)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not names:
        raise ValueError(f"{root}: no {group} folders (<root>/<{group}>/<image> expected)")
    found = []
    for index, name in enumerate(names):
        images, other = scan_folder(root / name)
        if not images and require_images:
            if not other:
                raise ValueError(f"{group} folder {root / name} is empty")
            listed = ", ".join(f"{suffix} {n}" for suffix, n in sorted(other.items()))
            raise ValueError(f"{group} folder {root / name} holds no file of a supported type ({listed}; "
                             f"supported: {' '.join(IMAGE_EXTENSIONS)})")
        if unsupported is not None:
            unsupported.update(other)
        found.extend((index, name, path) for path in images)
    return found


def labelled_folder(root: str | Path, source: str = "labels") -> Iterator[Item | Skip]:
    """``<root>/<class>/<image>``: class index = position of the folder name in sorted order (torchvision's
    ImageFolder rule); ``txt`` is the class name, ``json`` carries ``label`` and ``class_name``."""
    for label, name, path in grouped_images(root, "class"):
        rel = f"{name}/{path.name}"
        meta = {"uid": make_uid(source, rel), "source": source, "kind": "label", "label": label,
                "class_name": name, "image": rel}
        yield Item(_safe_key(f"{name}_{path.stem}"), str(path), name, meta, cls=label)


def identity_folders(root: str | Path, source: str = "identities",
                     captioner: Callable[[Path, str], tuple[list[str], dict]] | None = None) -> Iterator[Item | Skip]:
    """``<root>/<person>/<image>``: identity = position of the person folder in sorted order; the folder name is
    kept as ``json["person"]``. No text: these sets ship none.

    ``captioner(image path, key) -> (captions, attributes)`` (e.g. :func:`vlp.data.attributes.caption_image`) gives
    each image pseudo-captions read off its pixels: ``txt`` = the first, ``json["captions"]`` all of them (for
    ``data.caption: random``), ``json["attributes"]`` what they were made from. It reads the image here, in the
    process that lists the inputs, so an image it cannot read is skipped with the writer's reasons."""
    for identity, person, path in grouped_images(root, "person"):
        rel = f"{person}/{path.name}"
        meta = {"uid": make_uid(source, rel), "source": source, "kind": "identity", "identity": identity,
                "person": person, "image": rel}
        key = _safe_key(f"{person}_{path.stem}")
        if captioner is None:
            yield Item(key, str(path), None, meta)
            continue
        try:
            captions, attributes = captioner(path, key)
        except FileNotFoundError:
            yield Skip("missing_image", str(path))
            continue
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            yield Skip("bad_image", f"{path}: {e}")
            continue
        meta.update(captions=captions, attributes=attributes)
        yield Item(key, str(path), captions[0], meta)


def _coerce_integers(extra: dict) -> str | None:
    """CSV cells are strings; DESIGN.md's label and identity are ints. Returns the first field that is not."""
    for k in sorted(INTEGER_FIELDS.intersection(extra)):
        try:
            extra[k] = int(extra[k])
        except (TypeError, ValueError):
            return k
    return None


def _delimiter(path: Path) -> str:
    return "\t" if path.suffix.lower() == ".tsv" else ","


def _csv_header(path: Path) -> list[str]:
    with _open_text(path, newline="") as f:
        header = next(csv.reader(f, delimiter=_delimiter(path)), [])
    for column, name in enumerate(header, 1):
        bad = _bad_byte(name)
        if bad:
            raise ValueError(f"{path}:line 1: column {column} of the header is not UTF-8 ({bad}); "
                             "no row can be read without it")
    return header


def _csv_rows(path: Path) -> Iterator[tuple[int, dict | Skip]]:
    """(line number, row) of a CSV/TSV list; a row that cannot be trusted comes as a :class:`Skip` instead."""
    with _open_text(path, newline="") as f:
        reader = csv.DictReader(f, delimiter=_delimiter(path))
        for row in reader:
            where = f"{path}:line {reader.line_num}"
            cells = [v for k, v in row.items() if k is not None] + row.get(None, [])
            bad = next((f"cell {i}: {b}" for i, v in enumerate(cells, 1) if v and (b := _bad_byte(v))), None)
            if bad:
                yield reader.line_num, Skip("not_utf8", f"{where}: {bad}")
            elif None in row:  # DictReader's restkey: cells beyond the header, which no column name owns
                n = len(reader.fieldnames)
                yield reader.line_num, Skip("extra_cells", f"{where}: {n + len(row[None])} cells, the header has {n}")
            else:
                yield reader.line_num, row


def table(
    path: str | Path,
    image_column: str = "image",
    caption_column: str = "caption",
    base: str | Path | None = None,
    source: str | None = None,
) -> Iterator[Item | Skip]:
    """A CSV, TSV (``.tsv``) or parquet list of (local image path, caption, extra columns...); extra columns go
    into ``json``. Relative image paths are resolved against ``base`` (default: the list's folder). A row with
    more cells than the header, or with bytes that are not UTF-8, is skipped and reported."""
    path = Path(path)
    base = Path(base) if base is not None else path.parent
    source = source or path.stem
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        columns = set(rows[0]) if rows else set()
        numbered = ((i + 1, row) for i, row in enumerate(rows))
        where = "row"
    else:
        columns = set(_csv_header(path))
        numbered = _csv_rows(path)
        where = "line"
    for column in (image_column, caption_column):
        if column not in columns:
            raise ValueError(f"{path}: no column {column!r} (columns: {sorted(columns)})")
    for n, row in numbered:
        if isinstance(row, Skip):
            yield row
            continue
        image, caption = row[image_column], row[caption_column]
        if image is None or not str(image).strip():
            yield Skip("no_image_path", f"{path}:{where} {n}")
            continue
        if caption is None or not str(caption).strip():
            yield Skip("empty_caption", f"{path}:{where} {n}")
            continue
        extra = {k: v for k, v in row.items() if k not in (image_column, caption_column) and v not in (None, "")}
        bad = _coerce_integers(extra)
        if bad:
            yield Skip(f"bad_{bad}", f"{path}:{where} {n}: {extra[bad]!r}")
            continue
        meta = {"uid": extra.pop("uid", None) or make_uid(source, str(image), str(n)), "source": source,
                "kind": "caption", "image": str(image), **extra}
        image_path = Path(image) if Path(image).is_absolute() else base / image
        yield Item(f"{n:09d}", str(image_path), str(caption).strip(), meta, where=f"{path}:{where} {n}")
