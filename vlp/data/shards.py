"""Shard lists and raw tar reading.

A shard spec is what users type: ``data/{00000..00099}.tar``, several specs joined with ``::``, a ``pipe:``
command, or any fsspec URL (``s3://bucket/{0..9}.tar``, ``file:///...``). Expanding it gives :class:`Shard`
records that know their exact sample count where a ``manifest.json`` written by vlp lies beside them (or, for
local tars without one, from a scan of the tar headers, which reads no image data).

Reading yields raw samples: ``{"__key__", "__url__", "__index__", <ext>: bytes, ...}``, the members of one
WebDataset sample grouped by key. Damage inside a tar is not fatal: the shard ends early and the damage is
reported through ``on_error(reason, where)``.
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import braceexpand

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int | None = None  # exact count when known (manifest or header scan)


class ShardSpecError(ValueError):
    pass


def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def expand_urls(spec: str | list[str]) -> list[str]:
    """Brace-expand one spec or several (a list, or one string joined with ``::``); local globs are expanded too."""
    specs = spec if isinstance(spec, (list, tuple)) else str(spec).split("::")
    urls: list[str] = []
    for one in specs:
        one = str(one).strip()
        if not one:
            continue
        for url in braceexpand.braceexpand(one):
            if _is_local(url) and not url.startswith("file://") and any(c in url for c in "*?["):
                matches = sorted(glob.glob(url))
                if not matches:
                    raise ShardSpecError(f"shard spec {one!r}: the pattern {url!r} matches no file")
                urls.extend(matches)
            elif _is_local(url) and os.path.isdir(_local_path(url)):
                found = sorted(str(p) for p in Path(_local_path(url)).glob("*.tar"))
                if not found:
                    raise ShardSpecError(f"shard spec {one!r}: the folder {url!r} holds no .tar file")
                urls.extend(found)
            else:
                urls.append(url)
    if not urls:
        raise ShardSpecError(f"shard spec {spec!r} expands to no shard")
    missing = [u for u in urls if _is_local(u) and not os.path.exists(_local_path(u))]
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


def count_samples(path: str) -> int:
    """Samples in a local tar, from its headers alone (tarfile seeks over member data)."""
    count, last = 0, None
    with tarfile.open(path, "r:") as tf:
        for member in tf:
            if not member.isfile():
                continue
            key = split_key(member.name)[0]
            if key != last:
                count, last = count + 1, key
    return count


def expand(spec: str | list[str], count: bool = True) -> list[Shard]:
    """Shards of a spec with their sample counts: from manifests, else (local tars, ``count=True``) a header scan."""
    urls = expand_urls(spec)
    manifests: dict[str, dict[str, int]] = {}
    shards = []
    for url in urls:
        samples = None
        if _is_local(url):
            path = _local_path(url)
            directory = os.path.dirname(os.path.abspath(path))
            if directory not in manifests:
                manifest = read_manifest(directory) or {"shards": []}
                manifests[directory] = {s["name"]: s["samples"] for s in manifest.get("shards", [])}
            samples = manifests[directory].get(os.path.basename(path))
            if samples is None and count:
                try:
                    samples = count_samples(path)
                except (tarfile.TarError, OSError, EOFError):
                    samples = None  # damaged: read it shard-wise, the reader reports the damage
        shards.append(Shard(url, samples))
    return shards


def open_url(url: str):
    """A readable binary stream for a local path, a ``pipe:`` command or an fsspec URL."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    if _is_local(url):
        return open(_local_path(url), "rb")
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


def _ends_properly(tf: tarfile.TarFile, url: str, stream: _CountingReader | None) -> bool:
    # tarfile treats a header cut at a block boundary as the end of the archive; a whole archive has two zero
    # blocks (1024 bytes) after the last member, which is how a tar cut between members is detected.
    size = os.path.getsize(_local_path(url)) if stream is None else stream.drain()
    return size >= tf.offset + 1024


def iter_raw_samples(
    url: str,
    start: int = 0,
    stop: int | None = None,
    on_error: Callable[[str, str], None] | None = None,
) -> Iterator[dict]:
    """Samples ``start <= index < stop`` of one shard, members grouped by key.

    Local files are read with seeks, so samples before ``start`` cost a header read each. A truncated or
    corrupt tar ends the shard: samples already complete are kept, ``on_error("truncated_tar", url)`` is called.
    """
    report = on_error or (lambda reason, where: None)
    try:
        stream = None if _is_local(url) else _CountingReader(open_url(url))
        tf = tarfile.open(_local_path(url), "r:") if stream is None else tarfile.open(fileobj=stream, mode="r|*")
    except (OSError, tarfile.TarError, EOFError) as e:
        report("unreadable_shard", f"{url}: {e}")
        return
    index, current = -1, None
    try:
        with tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if key.startswith("__") or not ext:
                    continue
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
                if not _ends_properly(tf, url, stream):
                    raise EOFError("the archive ends without its end-of-archive blocks")
                yield current
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        report("truncated_tar", f"{url} after sample {index}: {e}")
    finally:
        if stream is not None:
            stream.close()
