"""Shard lists and raw tar reading.

A shard spec is what users type: ``data/{00000..00099}.tar``, several specs joined with ``::``, a ``pipe:``
command, any fsspec URL (``s3://bucket/{0..9}.tar``, ``file:///...``), or ``builtin:digits`` (a set vlp builds
into its cache on first use, :mod:`vlp.data.builtin`). Expanding it gives :class:`Shard` records that know their
exact sample count where a ``manifest.json`` written by vlp lies beside them (or, for local tars without one,
from a scan of the tar headers, which reads no image data).

Reading yields raw samples: ``{"__key__", "__url__", "__index__", <ext>: bytes, ...}``, the members of one
WebDataset sample grouped by key. Damage inside a tar is not fatal: the shard ends early, the sample the damage
cut into is dropped (its missing members cannot be told from absent ones), and the damage is reported through
``on_error(reason, where)``. The header scan stops at the same place, so a damaged local tar counts exactly the
samples a reader yields; :func:`expand` records the damage on the :class:`Shard` and warns once.

Reasons: ``unreadable_shard`` (no tar header at its start), ``truncated_tar`` (the data stops: a member or header
cut short, or no end-of-archive blocks), ``corrupt_tar`` (a header that is not one, e.g. bytes overwritten).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import braceexpand

MANIFEST = "manifest.json"
BUILTIN = "builtin:"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Damage:
    reason: str  # as counted among skipped samples: unreadable_shard, truncated_tar or corrupt_tar
    detail: str  # what was found, and where

    def describe(self, url: str, samples: int) -> str:
        return f"{url} ({self.reason}: {self.detail}; {samples} readable samples before it)"


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int | None = None  # exact count when known (manifest or header scan): readable samples if damaged
    damage: Damage | None = None  # found by the header scan; readers stop before it


class ShardSpecError(ValueError):
    pass


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _builtin_urls(spec: str) -> list[str]:
    # Imported on use: building a set needs the writer, which imports this module.
    from vlp.data.builtin import UnknownBuiltin, builtin_shards

    try:
        folder = builtin_shards(spec[len(BUILTIN):])
    except UnknownBuiltin as e:
        raise ShardSpecError(f"shard spec {spec!r}: {e}") from e
    return sorted(str(p) for p in folder.glob("*.tar"))


def expand_urls(spec: str | list[str]) -> list[str]:
    """Brace-expand one spec or several (a list, or one string joined with ``::``); local globs are expanded too."""
    specs = spec if isinstance(spec, (list, tuple)) else str(spec).split("::")
    urls: list[str] = []
    for one in specs:
        one = str(one).strip()
        if not one:
            continue
        if one.startswith(BUILTIN):
            urls.extend(_builtin_urls(one))
            continue
        for url in braceexpand.braceexpand(one):
            if is_local(url) and not url.startswith("file://") and any(c in url for c in "*?["):
                matches = sorted(glob.glob(url))
                if not matches:
                    raise ShardSpecError(f"shard spec {one!r}: the pattern {url!r} matches no file")
                urls.extend(matches)
            elif is_local(url) and os.path.isdir(local_path(url)):
                found = sorted(str(p) for p in Path(local_path(url)).glob("*.tar"))
                if not found:
                    raise ShardSpecError(f"shard spec {one!r}: the folder {url!r} holds no .tar file")
                urls.extend(found)
            else:
                urls.append(url)
    if not urls:
        raise ShardSpecError(f"shard spec {spec!r} expands to no shard")
    missing = [u for u in urls if is_local(u) and not os.path.exists(local_path(u))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ShardSpecError(f"shard spec {spec!r}: {missing[0]!r} does not exist{more}")
    return urls


def read_manifest(directory: str | Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardSpecError(f"{path}: not valid JSON ({e})") from e


def check_complete(spec: str | list[str] | Path) -> str | None:
    """Why the local folders of a shard spec (or a folder) do not hold a finished vlp shard set; None if they do.

    A finished set has its ``manifest.json`` (vlp's writer saves it after the last shard) and every shard it
    lists. A stopped writer leaves ``.*.partial`` files, or shards without a manifest. Folders written by other
    tools (no manifest, shards not owned by ``vlp``) pass; remote shards are not checked.
    """
    urls = expand_urls(str(spec) if isinstance(spec, Path) else spec)
    folders = sorted({os.path.dirname(os.path.abspath(local_path(u))) for u in urls if is_local(u)})
    reasons = [f"{folder}: {reason}" for folder in folders if (reason := _folder_incomplete(Path(folder)))]
    return "; ".join(reasons) or None


def _folder_incomplete(folder: Path) -> str | None:
    problems = []
    partial = sorted(p.name for p in folder.glob(".*.partial"))
    if partial:
        more = f" and {len(partial) - 1} more" if len(partial) > 1 else ""
        problems.append(f"unfinished files of a writer that stopped ({partial[0]}{more})")
    try:
        manifest = read_manifest(folder)
    except ShardSpecError as e:
        return str(e)
    if manifest is None:
        if written_by_vlp(folder):
            problems.append(f"no {MANIFEST} beside shards vlp wrote (it is saved after the last shard)")
    else:
        absent = [s["name"] for s in manifest.get("shards", []) if not (folder / s["name"]).exists()]
        if absent:
            more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
            problems.append(f"{MANIFEST} lists shards that are absent ({absent[0]}{more})")
    return "; ".join(problems) or None


def written_by_vlp(folder: Path) -> bool:
    # vlp's writer gives every member the owner "vlp"; one header of one shard tells.
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        return False
    try:
        with tarfile.open(tars[0], "r:") as tf:
            member = tf.next()
    except (tarfile.TarError, OSError, EOFError):
        return False
    return member is not None and member.uname == "vlp"


def scan_samples(path: str) -> tuple[int, Damage | None]:
    """Readable samples in a local tar and its damage, from its headers alone (tarfile seeks over member data).

    Counts what :func:`iter_raw_samples` yields: the samples complete before any damage."""
    count, last = 0, None
    try:
        tf = _Tar.open(path, "r:")
    except (tarfile.TarError, OSError, EOFError) as e:
        return 0, Damage("unreadable_shard", str(e))
    try:
        with tf:
            for key, _, _ in _sample_members(tf):
                if key != last:
                    count, last = count + 1, key
            damage = _end_damage(tf, os.path.getsize(path))
    except (tarfile.TarError, OSError, EOFError) as e:
        damage = Damage("truncated_tar", str(e))
    if damage is None:
        return count, None
    return max(count - 1, 0), damage  # less the sample the damage cut into


def expand(spec: str | list[str], count: bool = True) -> list[Shard]:
    """Shards of a spec with their sample counts: from manifests, else (local tars, ``count=True``) a header scan."""
    urls = expand_urls(spec)
    manifests: dict[str, dict[str, int]] = {}
    shards = []
    for url in urls:
        samples = None
        if is_local(url):
            path = local_path(url)
            directory = os.path.dirname(os.path.abspath(path))
            if directory not in manifests:
                manifest = read_manifest(directory) or {"shards": []}
                manifests[directory] = {s["name"]: s["samples"] for s in manifest.get("shards", [])}
            samples = manifests[directory].get(os.path.basename(path))
            if samples is None and count:
                samples, damage = scan_samples(path)
                if damage is not None:
                    log.warning("damaged shard %s: only the samples before the damage are read",
                                damage.describe(url, samples))
                shards.append(Shard(url, samples, damage))
                continue
        shards.append(Shard(url, samples))
    return shards


def open_url(url: str):
    """A readable binary stream for a local path, a ``pipe:`` command or an fsspec URL."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    if is_local(url):
        return open(local_path(url), "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


class _CountingReader:
    """Counts the bytes a stream delivers, so a tar cut at a member boundary can be told from a whole one."""

    def __init__(self, raw):
        self.raw, self.count = raw, 0

    def read(self, n=-1):
        data = self.raw.read(n)
        self.count += len(data)
        return data

    def drain(self) -> int:
        while self.read(1 << 20):
            pass
        return self.count

    def close(self):
        self.raw.close()


class _Header(tarfile.TarInfo):
    @classmethod
    def fromtarfile(cls, tarfile_):
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as e:
            tarfile_.end = e
            raise


class _Tar(tarfile.TarFile):
    """A TarFile that keeps why its members ended: after the first header, tarfile ends the archive silently at a
    zero block, at the end of the data, at a cut header and at one that is not a header alike."""

    tarinfo = _Header
    end: tarfile.HeaderError | None = None


def _sample_members(tf: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, extension, member) of the members that belong to samples, in archive order."""
    for member in tf:
        if not member.isfile():
            continue
        key, ext = split_key(member.name)
        if key.startswith("__") or not ext:
            continue
        yield key, ext, member


def _end_damage(tf: _Tar, size: int) -> Damage | None:
    """Why a tar whose members have ended is damaged (None if it ended properly), given its size in bytes."""
    if isinstance(tf.end, tarfile.InvalidHeaderError):
        return Damage("corrupt_tar", f"no valid tar header at byte {tf.offset} ({tf.end})")
    if isinstance(tf.end, tarfile.TruncatedHeaderError):
        return Damage("truncated_tar", f"a tar header cut short at byte {tf.offset}")
    # A whole archive has two zero blocks (1024 bytes) after its last member.
    if not isinstance(tf.end, tarfile.EOFHeaderError) or size < tf.offset + 1024:
        return Damage("truncated_tar", "the archive ends without its end-of-archive blocks")
    return None


def iter_raw_samples(
    url: str,
    start: int = 0,
    stop: int | None = None,
    on_error: Callable[[str, str], None] | None = None,
) -> Iterator[dict]:
    """Samples ``start <= index < stop`` of one shard, members grouped by key.

    Local files are read with seeks, so samples before ``start`` cost a header read each. A truncated or
    corrupt tar ends the shard: samples already complete are kept, ``on_error(reason, where)`` is called.
    """
    report = on_error or (lambda reason, where: None)
    try:
        stream = None if is_local(url) else _CountingReader(open_url(url))
        tf = _Tar.open(local_path(url), "r:") if stream is None else _Tar.open(fileobj=stream, mode="r|*")
    except (OSError, tarfile.TarError, EOFError) as e:
        report("unreadable_shard", f"{url}: {e}")
        return
    index, current = -1, None
    try:
        with tf:
            for key, ext, member in _sample_members(tf):
                if current is None or key != current["__key__"]:
                    if current is not None and index >= start:
                        yield current
                    index += 1
                    if stop is not None and index >= stop:
                        current = None
                        break
                    current = {"__key__": key, "__url__": url, "__index__": index}
                if index >= start:
                    data = tf.extractfile(member)
                    current[ext] = data.read() if data is not None else b""
                    if len(current[ext]) != member.size:
                        raise EOFError(f"member {member.name} is cut short")
            if current is not None and index >= start:
                damage = _end_damage(tf, os.path.getsize(local_path(url)) if stream is None else stream.drain())
                if damage is not None:
                    report(damage.reason, f"{url} {_after(index)}: {damage.detail}")
                    return
                yield current
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        report("truncated_tar", f"{url} {_after(index)}: {e}")
    finally:
        if stream is not None:
            stream.close()


def iter_sample_headers(
    url: str, on_error: Callable[[str, str], None] | None = None
) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
    """(key, members) of the samples of a local tar, from its headers alone: member data is seeked over, and lies at
    ``member.offset_data``, ``member.size`` bytes long, for a caller that copies or reads only some of it.

    Yields the samples :func:`iter_raw_samples` yields and reports damage to ``on_error`` with the same reasons and
    places, so such a caller sees what a reader of the whole shard sees."""
    report = on_error or (lambda reason, where: None)
    path = local_path(url)
    try:
        tf = _Tar.open(path, "r:")
    except (OSError, tarfile.TarError, EOFError) as e:
        report("unreadable_shard", f"{url}: {e}")
        return
    index, key, members = -1, None, []
    try:
        with tf:
            for k, _, member in _sample_members(tf):
                if k != key:
                    if key is not None:
                        yield key, members
                    index, key, members = index + 1, k, []
                members.append(member)
            damage = _end_damage(tf, os.path.getsize(path)) if key is not None else None
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        report("truncated_tar", f"{url} {_after(index)}: {e}")
        return
    if damage is not None:
        report(damage.reason, f"{url} {_after(index)}: {damage.detail}")
        return
    if key is not None:
        yield key, members


def _after(index: int) -> str:
    # ``index`` is the sample being read when the damage showed: the one it cut into, which is dropped.
    return f"after sample {index - 1}" if index > 0 else "before its first sample"
