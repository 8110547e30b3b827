"""Resharding speed (``vlp.filtering.reshard``) against ``cp`` of the same pool tars, side by side on one host.

    .venv/bin/python benchmarks/reshard_speed.py                  # about a minute on 2 cores, a 0.5 GB pool
    .venv/bin/python benchmarks/reshard_speed.py --pool 'pool/{00000..00039}.tar' --repeats 5

What it does:
1. unless ``--pool`` is given, writes all of Flickr8k (40,455 samples, one per caption, images stored as read) into
   ``benchmarks/out/reshard_speed/pool`` (git-ignored) if missing, 1000 samples per shard;
2. writes two uid files: every pool uid (100%), and a seeded random half of them (50%);
3. for each (kept fraction, workers) runs ``reshard`` and ``cp`` of the pool tars into a fresh folder, alternating
   which side goes first, ``--repeats`` times each, and reports the median MB/s of each side: bytes of the output
   shards (reshard) or of the copied tars (cp) over wall time. ``cp + sync`` also flushes the copies to disk, as
   reshard does for each shard it writes (fsync before the rename); plain ``cp`` leaves them in the page cache;
4. times the first pass over the pool (tar headers and json members only) against vlp's full raw reader
   (``iter_raw_samples``, every member's bytes), the choice this pass was built on;
5. prints a Markdown table and the CPU model, and saves ``benchmarks/out/reshard_speed/results.json``.

The page cache cannot be dropped here: every side reads a pool already in the cache (warmed first).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "flickr8k"
OUT = REPO / "benchmarks" / "out" / "reshard_speed"
GOAL = 0.5  # reshard MB/s over cp MB/s


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_pool(data: Path, folder: Path) -> str:
    if (folder / "manifest.json").exists():
        return str(folder)
    from vlp.data import WriterOptions, sources, write_shards

    if not (data / "captions.txt").exists():
        sys.exit(f"{data}/captions.txt not found: pass --data <flickr8k folder> or --pool <shard spec>")
    log(f"writing the Flickr8k pool into {folder}")
    items = sources.caption_file(data / "images", data / "captions.txt", source="flickr8k")
    write_shards(items, folder, WriterOptions(samples_per_shard=1000, workers=2, verify=False), source="flickr8k",
                 progress=False)
    return str(folder)


def pool_uids(urls: list[str]) -> list[str]:
    from vlp.data.shards import iter_raw_samples

    return [json.loads(s["json"])["uid"] for url in urls for s in iter_raw_samples(url)]


def warm(urls: list[str]) -> None:
    for url in urls:
        with open(url, "rb") as f:
            while f.read(1 << 22):
                pass


def time_reshard(spec: str, uid_file: Path, dest: Path, workers: int) -> tuple[float, int]:
    from vlp.filtering.reshard import reshard

    shutil.rmtree(dest, ignore_errors=True)
    start = time.perf_counter()
    manifest = reshard(spec, uid_file, dest, samples_per_shard=1000, workers=workers, progress=False)
    return time.perf_counter() - start, manifest["bytes"]


def time_cp(urls: list[str], dest: Path, sync: bool) -> tuple[float, int]:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    start = time.perf_counter()
    subprocess.run(["cp", *urls, str(dest)], check=True)
    if sync:
        subprocess.run(["sync", *[str(dest / Path(u).name) for u in urls]], check=True)
    seconds = time.perf_counter() - start
    return seconds, sum((dest / Path(u).name).stat().st_size for u in urls)


def first_pass(urls: list[str]) -> dict[str, float]:
    """Samples/s of the two ways of finding the uids: headers + json members, and the full raw reader."""
    from vlp.data.shards import iter_raw_samples, iter_sample_headers
    from vlp.filtering.reshard import scan_shard
    from vlp.filtering.uids import DTYPE

    none = np.empty(0, DTYPE)
    rates = {}
    for name, count in (("headers + json (reshard's first pass)", lambda u: scan_shard(u, none).samples),
                        ("iter_raw_samples + json.loads",
                         lambda u: sum(bool(json.loads(s["json"])["uid"]) for s in iter_raw_samples(u))),
                        ("headers only (iter_sample_headers)", lambda u: sum(1 for _ in iter_sample_headers(u)))):
        start = time.perf_counter()
        samples = sum(count(u) for u in urls)
        rates[name] = samples / (time.perf_counter() - start)
    return rates


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", help="shard spec of a local pool (default: Flickr8k written into --out)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Flickr8k folder (images/, captions.txt)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from vlp.data.shards import expand_urls
    from vlp.filtering.uids import write_uids

    spec = args.pool or ensure_pool(args.data, args.out / "pool")
    urls = expand_urls(spec)
    pool_bytes = sum(Path(u).stat().st_size for u in urls)
    uids = pool_uids(urls)
    log(f"pool: {len(urls)} shards, {len(uids):,} samples, {pool_bytes / 1e6:.0f} MB")
    rng = np.random.default_rng(0)
    uid_files = {100: args.out / "uids_100.npy", 50: args.out / "uids_50.npy"}
    write_uids(uid_files[100], uids)
    write_uids(uid_files[50], [u for u, keep in zip(uids, rng.random(len(uids)) < 0.5) if keep])
    warm(urls)

    cp = {"cp": [], "cp + sync": []}
    rows = []
    for kept, uid_file in uid_files.items():
        for workers in args.workers:
            times = {"reshard": [], "cp": [], "cp + sync": []}
            for r in range(args.repeats):
                sides = ["reshard", "cp", "cp + sync"]
                for side in sides[r % 3:] + sides[:r % 3]:  # each side goes first once in three
                    dest = args.out / "dest"
                    if side == "reshard":
                        seconds, nbytes = time_reshard(spec, uid_file, dest, workers)
                    else:
                        seconds, nbytes = time_cp(urls, dest, sync=side == "cp + sync")
                    times[side].append(nbytes / seconds / 1e6)
                    log(f"kept {kept}%, workers {workers}, {side}: {nbytes / 1e6:.0f} MB in {seconds:.2f}s")
            shutil.rmtree(args.out / "dest", ignore_errors=True)
            row = {"kept": kept, "workers": workers, **{k: statistics.median(v) for k, v in times.items()},
                   "runs": times}
            cp["cp"].extend(times["cp"])
            cp["cp + sync"].extend(times["cp + sync"])
            rows.append(row)
    passes = first_pass(urls)

    cpu = cpu_model()
    lines = [f"Pool: {len(urls)} shards, {len(uids):,} samples, {pool_bytes / 1e6:.0f} MB; CPU: {cpu}; "
             f"medians of {args.repeats} runs, page cache warm for every side.", "",
             "| kept | workers | reshard MB/s | cp MB/s | cp + sync MB/s | reshard / cp | reshard / (cp + sync) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['kept']}% | {row['workers']} | {row['reshard']:.0f} | {row['cp']:.0f} | "
                     f"{row['cp + sync']:.0f} | {row['reshard'] / row['cp']:.2f} | "
                     f"{row['reshard'] / row['cp + sync']:.2f} |")
    lines += ["", "| first pass over the pool | samples/s |", "|---|---|"]
    lines += [f"| {name} | {rate:,.0f} |" for name, rate in passes.items()]
    worst = min(row["reshard"] / row["cp"] for row in rows)
    lines += ["", f"goal reshard >= {GOAL} x cp: {'met' if worst >= GOAL else 'NOT met'} (lowest ratio {worst:.2f})"]
    print("\n".join(lines))
    (args.out / "results.json").write_text(json.dumps({"cpu": cpu, "pool": spec, "rows": rows, "first_pass": passes},
                                                      indent=1))


if __name__ == "__main__":
    main()
