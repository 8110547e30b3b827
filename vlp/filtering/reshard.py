"""Copy the samples a uid file keeps from a pool of WebDataset shards into new shards, member bytes as they are.

The last step of DataComp's filtering track (Gadre et al. 2023): a selection (:mod:`vlp.filtering.select`, or any
DataComp uid file) names the kept samples by uid, and training wants them as shards of their own. Nothing is decoded
or re-encoded: every member of a kept sample (image, caption, json, and any other extension) is copied byte for
byte under its name; only the tar headers are new (mtime 0, owner ``vlp``, as :mod:`vlp.data.writer` writes them).

Two passes, so that the output depends on the pool and the uid file alone, never on the number of workers:

1. scan (one task per pool shard): the tar headers and the ``json`` members only. Each sample's uid is looked up in
   the uid file (binary search, as DataComp's resharder does); the wanted samples' member offsets are kept.
   Headers are parsed directly (5x faster than tarfile); a shard with anything but plain ustar headers, or with
   damage, is read by :func:`vlp.data.shards.iter_sample_headers`, which reports damage as vlp's reader does.
2. copy (one task per output shard): the kept samples, in pool order, are numbered; output shard ``i`` takes
   numbers ``[i*n, (i+1)*n)``, so every shard is full but the last. It is started as soon as the scans of the pool
   shards before it are in (scanning and copying overlap); its worker copies runs of samples whose headers are
   already vlp's with ``copy_file_range``, and writes new headers before the member bytes of the others.

A uid that appears more than once in the pool is kept at its first occurrence in pool order. Output guarantees are
the writer's (:mod:`vlp.data.writer`): ``.<name>.partial`` + fsync + rename per shard, ``manifest.json`` written
last, a finished set never overwritten unless asked, a set a killed run left behind written again from the start,
worker processes that die with the process that started them, byte-reproducible tars.
"""
from __future__ import annotations

import json
import mmap
import multiprocessing
import os
import struct
import sys
import tarfile
import time
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vlp.atomic import write_text
from vlp.data.shards import MANIFEST, expand_urls, is_local, iter_sample_headers, local_path, split_key
from vlp.data.writer import WriterOptions, check_output, exit_if_orphaned, stop_with_writer
from vlp.filtering.uids import DTYPE, read_uids, to_hex, uid_pair

MAX_EXAMPLES = 20  # uids and samples listed per kind of problem in the manifest (all are counted)
SHARD_NAME = "{index:05d}.tar"
BLOCK, RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE
ZERO_BLOCK = bytes(BLOCK)

# (member name, offset of its data in the pool shard, size): what the copy pass needs of a member whose header it
# writes anew
Member = tuple[str, int, int]
# (start, end, members) of a sample in its pool shard: its bytes [start, end) are copied as they are when members is
# None (every header already is the one this module would write), else each member gets a new header
Span = tuple[int, int, "list[Member] | None"]


class ReshardError(RuntimeError):
    pass


def _tar_header(name: str, size: int) -> bytes:
    # The header webdataset's TarWriter gives a member in vlp's writer (tarfile's default PAX format: a plain ustar
    # header unless the name needs more), so resharding a vlp pool in full gives back the pool's bytes.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "vlp", "vlp"
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


TEMPLATE = _tar_header("", 0)  # all but the name, size and checksum fields are the same in every header
TEMPLATE_SUM = sum(TEMPLATE) - sum(TEMPLATE[124:136]) - sum(TEMPLATE[148:156]) + 8 * ord(" ")


def member_header(name: str, size: int) -> bytes:
    """:func:`_tar_header`'s bytes, built from :data:`TEMPLATE` (tarfile takes 10x longer per header)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or not raw.isascii() or size >= 8 ** 11:  # these need a pax header
        return _tar_header(name, size)
    size_field = b"%011o\0" % size
    checksum = TEMPLATE_SUM + sum(raw) + sum(size_field)  # the ustar checksum: all bytes, its own field as spaces
    return b"".join((raw, bytes(100 - len(raw)), TEMPLATE[100:124], size_field, TEMPLATE[136:148],
                     b"%06o\0 " % checksum, TEMPLATE[156:]))


HEADER = struct.Struct("100s24s12s12s8s356s")  # name, mode+uid+gid, size, mtime, checksum, the rest


def _plain_samples(mm: mmap.mmap) -> list[list] | None:
    """[key, members, start, end, copy as is, json member] of the samples of a tar made only of plain ustar headers
    of regular files, parsed directly (tarfile takes 5x longer); None for anything else (a pax or long-name header,
    a prefix, a link, a directory, a bad checksum, damage), which :func:`vlp.data.shards.iter_sample_headers` then
    reads with tarfile's care.

    Members are grouped into samples as vlp's reader groups them. A sample is copied as it is when its members lie
    back to back and every header is the one :func:`member_header` would write."""
    size = len(mm)
    pos, offsets, checksums, samples = 0, [], [], []
    last = [None]
    unpack, (_, t_ids, _, t_mtime, _, t_rest) = HEADER.unpack_from, HEADER.unpack(TEMPLATE)
    while True:
        if pos + BLOCK > size:
            return None  # no end-of-archive blocks
        name_f, ids, size_f, mtime, checksum_f, rest = unpack(mm, pos)
        raw = name_f.split(b"\0", 1)[0]
        if ids == t_ids and mtime == t_mtime and rest == t_rest:  # vlp's own header: no typeflag or prefix to check
            try:
                length, checksum = int(size_f[:11], 8), int(checksum_f[:6], 8)
            except ValueError:
                return None
            as_is = (size_f == b"%011o\0" % length and checksum_f == b"%06o\0 " % checksum and raw.isascii()
                     and name_f.count(0) == 100 - len(raw))
        else:
            if name_f[0] == 0 and mm[pos:pos + BLOCK] == ZERO_BLOCK:
                if size < pos + 2 * BLOCK:
                    return None
                break
            if rest[0] not in (0x30, 0) or (rest[101:107] == b"ustar\0" and rest[189] != 0):
                return None
            try:
                length = int(size_f.split(b"\0", 1)[0].strip() or b"0", 8)
                checksum = int(checksum_f.split(b"\0", 1)[0].strip() or b"0", 8)
            except ValueError:
                return None
            as_is = False
        data, end = pos + BLOCK, pos + BLOCK + length + -length % BLOCK
        if end > size or raw.endswith(b"/"):
            return None
        offsets.append(pos)
        checksums.append(checksum)
        name = raw.decode("utf-8", "surrogateescape")
        key, ext = split_key(name) if "/" in name else name.partition(".")[::2]
        if key.startswith("__") or not ext:
            pos = end
            continue
        if last[0] == key:
            last[1].append((name, data, length))
            last[4] = last[4] and as_is and last[3] == pos
            last[3] = end
        else:
            last = [key, [(name, data, length)], pos, end, as_is, None]
            samples.append(last)
        if ext.lower() == "json":
            last[5] = (data, length)
        pos = end
    if offsets:
        blocks = np.frombuffer(mm, np.uint8, count=size // BLOCK * BLOCK).reshape(-1, BLOCK)[np.array(offsets) // BLOCK]
        sums = blocks.sum(axis=1, dtype=np.int64) - blocks[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * ord(" ")
        del blocks  # a view of mm must not outlive this call: mm is closed by the caller
        if not np.array_equal(sums, np.array(checksums, dtype=np.int64)):
            return None
    return samples


@dataclass
class PoolScan:
    """What the first pass found in one pool shard."""

    url: str
    samples: int = 0  # readable samples
    uids: np.ndarray = field(default_factory=lambda: np.empty(0, DTYPE))  # of the samples with a readable uid
    wanted: list[tuple[int, str, Span]] = field(default_factory=list)  # (row in uids, key, span)
    no_uid: list[tuple[str, str]] = field(default_factory=list)  # (reason, where)
    damage: list[tuple[str, str]] = field(default_factory=list)  # (reason, where), from iter_sample_headers


JSON = json.JSONDecoder()


def _read_uid(mm: mmap.mmap, json_at: tuple[int, int] | None) -> tuple[tuple[int, int] | None, str]:
    """((high, low) halves of the uid, '') or (None, reason) for one sample, from its json member at (offset, size)."""
    if json_at is None:
        return None, "no_json"
    start, size = json_at
    try:
        uid = JSON.decode(mm[start:start + size].decode("utf-8")).get("uid")
    except (ValueError, AttributeError):  # AttributeError: valid json that is not an object
        return None, "bad_json"
    if uid is None:
        return None, "no_uid"
    try:
        return uid_pair(uid), ""
    except ValueError:
        return None, "bad_uid"


def _samples(url: str, mm: mmap.mmap | None, damage: list) -> list[list]:
    found = _plain_samples(mm) if mm is not None else None
    if found is not None:
        return found
    samples = []
    for key, members in iter_sample_headers(url, on_error=lambda *d: damage.append(d)):
        json_at = [(m.offset_data, m.size) for m in members if split_key(m.name)[1] == "json"]
        samples.append([key, [(m.name, m.offset_data, m.size) for m in members], 0, 0, False,
                        json_at[-1] if json_at else None])  # the last, as vlp's reader keeps it
    return samples


def scan_shard(url: str, requested: np.ndarray) -> PoolScan:
    """First pass over one pool shard: uids of its samples, and where those ``requested`` holds lie."""
    scan = PoolScan(url)
    uids, wanted_at = [], []
    with open(local_path(url), "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # an empty file: iter_sample_headers says what is wrong with it
            mm = None
        try:
            samples = _samples(url, mm, scan.damage)
            scan.samples = len(samples)
            for key, members, start, end, as_is, json_at in samples:
                uid, reason = _read_uid(mm, json_at)
                if uid is None:
                    scan.no_uid.append((reason, f"{url}: sample {key}"))
                    continue
                uids.append(uid)
                wanted_at.append((key, (start, end, None if as_is else members)))
        finally:
            if mm is not None:
                mm.close()
    scan.uids = np.empty(len(uids), DTYPE)
    if uids:
        pairs = np.array(uids, dtype=np.uint64)
        scan.uids["f0"], scan.uids["f1"] = pairs[:, 0], pairs[:, 1]
    scan.wanted = [(int(row), *wanted_at[row]) for row in np.flatnonzero(_isin(scan.uids, requested))]
    return scan


def _isin(query: np.ndarray, sorted_uids: np.ndarray) -> np.ndarray:
    """For each uid of ``query``, whether ``sorted_uids`` holds it (binary search, as DataComp's resharder does)."""
    where = np.searchsorted(sorted_uids, query)
    found = np.zeros(len(query), dtype=bool)
    inside = where < len(sorted_uids)
    found[inside] = sorted_uids[where[inside]] == query[inside]
    return found


_requested: np.ndarray | None = None  # set in pool processes only


def _init_worker(parent_pid: int, requested: np.ndarray) -> None:
    global _requested
    stop_with_writer(parent_pid)
    _requested = requested


def _scan_in_worker(url: str) -> PoolScan:
    return scan_shard(url, _requested)


class _ShardFile:
    """An output tar being written: new headers and member bytes gathered in memory, runs of pool bytes copied by
    the kernel (``copy_file_range``: no trip through this process, which is what keeps up with ``cp``)."""

    def __init__(self, path: Path):
        self.file = open(path, "wb", buffering=0)
        self.pending: list[bytes] = []
        self.pending_bytes = self.offset = 0

    def write(self, data: bytes) -> None:
        self.pending.append(data)
        self.pending_bytes += len(data)
        self.offset += len(data)
        if self.pending_bytes >= 1 << 22:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.file.write(b"".join(self.pending))
            self.pending, self.pending_bytes = [], 0

    def copy(self, fd: int, start: int, size: int, url: str, what: str) -> None:
        self.flush()
        done = 0
        try:
            while done < size:
                n = os.copy_file_range(fd, self.file.fileno(), size - done, start + done)
                if n == 0:
                    break
                done += n
        except OSError:  # another filesystem on an older kernel, or no copy_file_range: read and write
            data = os.pread(fd, size - done, start + done)
            self.file.write(data)
            done += len(data)
        if done != size:
            raise ReshardError(f"{url}: {what} ends after {done} of its {size} bytes; the pool shard changed while "
                               "it was resharded")
        self.offset += size

    def finish(self) -> None:
        end = 2 * BLOCK  # the end-of-archive blocks, then padding to a whole record, as tarfile closes an archive
        self.write(bytes(end + -(self.offset + end) % RECORD))
        self.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def write_shard(task: tuple[int, list[tuple[str, list[Span]]], str]) -> dict:
    """Second pass, one output shard: ``segments`` are (pool shard, spans of its kept samples) in output order."""
    index, segments, out = task
    name = SHARD_NAME.format(index=index)
    final, partial = Path(out) / name, Path(out) / f".{name}.partial"
    count = 0
    shard = _ShardFile(partial)
    try:
        for url, spans in segments:
            with open(local_path(url), "rb") as src:
                fd = src.fileno()
                run_start = run_end = 0  # a run of samples copied as they are, back to back in the pool shard
                for start, end, members in spans:
                    count += 1
                    if members is None and start == run_end and run_end > run_start:
                        run_end = end
                        continue
                    if run_end > run_start:
                        shard.copy(fd, run_start, run_end - run_start, url, f"bytes {run_start}-{run_end}")
                    run_start = run_end = 0
                    if members is None:
                        run_start, run_end = start, end
                        continue
                    for member, data_start, size in members:
                        shard.write(member_header(member, size))
                        data = os.pread(fd, size, data_start)
                        if len(data) != size:
                            raise ReshardError(f"{url}: member {member} ends after {len(data)} of its {size} bytes; "
                                               "the pool shard changed while it was resharded")
                        shard.write(data)
                        shard.write(bytes(-size % BLOCK))
                if run_end > run_start:
                    shard.copy(fd, run_start, run_end - run_start, url, f"bytes {run_start}-{run_end}")
        shard.finish()
    finally:
        shard.file.close()
    exit_if_orphaned()
    os.replace(partial, final)
    return {"name": name, "samples": count, "bytes": final.stat().st_size}


def _requested_uids(uids: str | Path | np.ndarray) -> tuple[np.ndarray, str | None]:
    if isinstance(uids, np.ndarray):
        if uids.dtype != DTYPE:
            raise ValueError(f"uid array of dtype {uids.dtype}, expected DataComp's uid dtype {DTYPE}")
        return np.unique(uids), None  # sorted and without repeats, as the binary search needs
    return read_uids(uids), str(uids)


def _check_pool(urls: list[str], out: Path) -> None:
    remote = [u for u in urls if not is_local(u)]
    if remote:
        raise ValueError(f"reshard copies members from local tars by their offsets; {remote[0]!r} is not local "
                         "(copy the pool to a local disk first)")
    inside = [u for u in urls if Path(local_path(u)).resolve().parent == out.resolve()]
    if inside:
        raise ValueError(f"the output folder {out} holds pool shards ({inside[0]}); choose another folder")


class _Numbering:
    """Numbers the kept samples in pool order as the scans arrive (a uid's first occurrence is kept, a later one
    left out) and cuts them into output shards of ``n``: a shard is ready as soon as the scans before it are in,
    so copying overlaps scanning, and the cut depends on the pool and the uid file alone."""

    def __init__(self, out: Path, n: int):
        self.out, self.n = str(out), n
        self.kept: set[bytes] = set()  # uids as their 16 bytes
        self.keys: dict[str, str] = {}  # key -> pool shard of the kept samples
        self.index, self.count, self.segments = 0, 0, []

    def add(self, scan: PoolScan) -> list[tuple[int, list[tuple[str, list[Span]]], str]]:
        ready = []
        uids = scan.uids.tobytes()
        for row, key, span in scan.wanted:
            uid = uids[16 * row:16 * row + 16]
            if uid in self.kept:
                continue
            if key in self.keys:
                # WebDataset readers group consecutive members by key: two samples with one key can read as one.
                raise ReshardError(f"sample key {key!r} is kept from {self.keys[key]} and from {scan.url}: keys "
                                   "must be unique within a shard set")
            self.kept.add(uid)
            self.keys[key] = scan.url
            if not self.segments or self.segments[-1][0] != scan.url:
                self.segments.append((scan.url, []))
            self.segments[-1][1].append(span)
            self.count += 1
            if self.count == self.n:
                ready.append(self._cut())
        scan.wanted = []  # its spans now belong to the tasks
        return ready

    def finish(self) -> list:
        return [self._cut()] if self.count else []

    def _cut(self) -> tuple[int, list[tuple[str, list[Span]]], str]:
        task = (self.index, self.segments, self.out)
        self.index, self.count, self.segments = self.index + 1, 0, []
        return task


def _report(scans: list[PoolScan], requested: np.ndarray) -> dict:
    """The pool's part of the manifest's ``reshard`` section, from the uids of the whole pool."""
    pool_uids = np.concatenate([s.uids for s in scans]) if scans else np.empty(0, DTYPE)
    distinct, counts = np.unique(pool_uids, return_counts=True)
    found = _isin(requested, distinct)
    absent = requested[~found]
    no_uid = [item for s in scans for item in s.no_uid]
    repeated = distinct[counts > 1]
    return {
        "pool_shards": len(scans),
        "pool_samples": sum(s.samples for s in scans),
        "uids_in_pool": int(found.sum()),
        "absent": {"count": len(absent), "examples": to_hex(absent[:MAX_EXAMPLES])},
        "no_uid": {"count": len(no_uid), "reasons": dict(sorted(Counter(r for r, _ in no_uid).items())),
                   "examples": [{"reason": r, "where": w} for r, w in no_uid[:MAX_EXAMPLES]]},
        "duplicates": {"count": int((counts - 1).sum()), "uids": len(repeated),
                       "examples": to_hex(repeated[:MAX_EXAMPLES]),
                       "kept": "the first occurrence in pool order; the later ones are left out"},
    }


def _run(urls: list[str], requested: np.ndarray, numbering: _Numbering, executor: ProcessPoolExecutor | None,
         workers: int, bar: tqdm) -> tuple[list[PoolScan], list[dict]]:
    """Both passes: pool shards scanned in order (a few ahead), each output shard written once its samples are
    known."""
    scans, records = [], []
    if executor is None:
        for url in urls:
            scans.append(scan_shard(url, requested))
            for task in numbering.add(scans[-1]):
                records.append(write_shard(task))
                bar.update(records[-1]["samples"])
        bar.total = len(numbering.kept)
        for task in numbering.finish():
            records.append(write_shard(task))
            bar.update(records[-1]["samples"])
        return scans, records
    ahead = iter(urls)
    scanning: deque[Future] = deque()
    writing: deque[Future] = deque()

    def scan_more() -> None:
        while len(scanning) < 2 * workers and (url := next(ahead, None)) is not None:
            scanning.append(executor.submit(_scan_in_worker, url))

    def collect(wait: bool) -> None:
        while writing and (wait or writing[0].done()):
            records.append(writing.popleft().result())
            bar.update(records[-1]["samples"])

    scan_more()
    while scanning:
        scans.append(scanning.popleft().result())
        writing.extend(executor.submit(write_shard, task) for task in numbering.add(scans[-1]))
        scan_more()
        collect(wait=False)
    bar.total = len(numbering.kept)  # known now: the uids of the file that the pool holds
    writing.extend(executor.submit(write_shard, task) for task in numbering.finish())
    collect(wait=True)
    return scans, records


def reshard(pool: str | list[str], uids: str | Path | np.ndarray, out: str | Path, samples_per_shard: int = 10000,
            workers: int = 1, overwrite: bool = False, progress: bool = True) -> dict:
    """Copy the pool samples whose uids ``uids`` holds into ``out``; returns the manifest (``out/manifest.json``)."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    urls = expand_urls(pool)
    _check_pool(urls, out)
    requested, uid_file = _requested_uids(uids)
    check_output(out, WriterOptions(overwrite=overwrite))
    start = time.time()
    executor = None
    if workers > 1:
        # fork where prctl exists: the pool processes are then children of this process itself, which is what the
        # writer's die-with-parent checks rely on (see vlp.data.writer).
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
        executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                       initargs=(os.getpid(), requested))
    bar = tqdm(total=len(requested), unit="sample", desc=f"reshard -> {out}", disable=not progress)
    try:
        scans, records = _run(urls, requested, _Numbering(out, samples_per_shard), executor, workers, bar)
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(cancel_futures=True)

    report = _report(scans, requested)
    written = sum(r["samples"] for r in records)
    if written != report["uids_in_pool"]:
        raise ReshardError(f"{out}: wrote {written} samples, but {report['uids_in_pool']} uids of the uid file are "
                           "in the pool; no manifest written")
    damage = [item for s in scans for item in s.damage]
    spec = pool if isinstance(pool, str) else "::".join(str(p) for p in pool)
    manifest = {
        "format": "vlp-shards/1",
        "source": spec,
        "samples": written,
        "bytes": sum(r["bytes"] for r in records),
        "shards": records,
        "skipped": dict(sorted(Counter(reason for reason, _ in damage).items())),
        "skipped_items": [{"reason": r, "where": w} for r, w in damage],
        "options": {"samples_per_shard": samples_per_shard},
        "reshard": {"pool": spec, "uid_file": uid_file, "uids_requested": len(requested), "samples_kept": written,
                    **report},
        "seconds": round(time.time() - start, 2),
    }
    write_text(out / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False), fsync=True)
    return manifest


def format_report(manifest: dict, out: str | Path) -> str:
    r = manifest["reshard"]
    mb = manifest["bytes"] / 1e6
    lines = [f"kept {manifest['samples']:,} of {r['pool_samples']:,} pool samples ({r['uids_requested']:,} uids "
             f"asked for) in {len(manifest['shards'])} shards ({mb:.1f} MB) to {out} in {manifest['seconds']:.1f}s "
             f"({mb / max(manifest['seconds'], 1e-3):.0f} MB/s)"]
    if r["absent"]["count"]:
        lines.append(f"uids not in the pool: {r['absent']['count']:,}, e.g. {r['absent']['examples'][0]}")
    if r["no_uid"]["count"]:
        reasons = ", ".join(f"{k} {v:,}" for k, v in r["no_uid"]["reasons"].items())
        lines.append(f"pool samples without a readable uid: {r['no_uid']['count']:,} ({reasons}), "
                     f"e.g. {r['no_uid']['examples'][0]['where']}")
    if r["duplicates"]["count"]:
        lines.append(f"uids repeated in the pool: {r['duplicates']['uids']:,} ({r['duplicates']['count']:,} later "
                     "occurrences left out, the first kept)")
    if manifest["skipped"]:
        lines.append("damaged pool shards: " + ", ".join(f"{k} {v:,}" for k, v in manifest["skipped"].items()))
        lines.extend(f"  {e['reason']}: {e['where']}" for e in manifest["skipped_items"][:MAX_EXAMPLES])
    return "\n".join(lines)
