"""Peak memory and time of ``vlp filter`` (``filter_scores``) on simulated score tables, against an exact full sort.

    .venv/bin/python benchmarks/select_memory.py                          # 10^7, 3x10^7 and 10^8 rows
    .venv/bin/python benchmarks/select_memory.py --sizes 1e6 --baseline 1e6   # a minute: the smoke run

What it does:
1. writes score tables of ``--rows-per-file`` rows each (random uids, scores ~ N(0.25, 0.06) in float32, 1% rows
   not scored, random caption and image sizes) into ``benchmarks/out/select_memory/tables`` (git-ignored), as many
   as the largest size needs, reusing those already there; the generation time is printed;
2. per size, a scores folder whose manifest lists the first tables (symlinks), and, each in a fresh subprocess:
   ``filter_scores`` with ``score_top=0.3`` and ``caption_words>=2`` (about 24% kept), and with ``score_top=0.001``
   and the same threshold (about 0.1% kept), which separates the selection's own memory from the kept uids';
3. the exact-sort baseline on ``--baseline`` rows in a subprocess: every score in one array, sorted (what
   DataComp's ``get_threshold`` does), then the same ``>= cut`` selection per table;
4. prints a Markdown table and writes ``benchmarks/out/select_memory/results.json``.

Peak RSS is each child's ``ru_maxrss`` (``os.wait4``), so an interpreter with numpy, pyarrow and matplotlib loaded
is part of every figure; ``python -c 'import ...'`` alone is measured as the floor.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "benchmarks" / "out" / "select_memory"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def make_table(rng, n: int, shard: str):
    import numpy as np
    import pyarrow as pa

    from vlp.filtering.table import SCHEMA

    HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    raw = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    digits = np.empty((n, 32), dtype=np.uint8)
    digits[:, 0::2], digits[:, 1::2] = HEX[raw >> 4], HEX[raw & 15]
    uid = pa.StringArray.from_buffers(n, pa.py_buffer(np.arange(n + 1, dtype=np.int32) * 32),
                                      pa.py_buffer(digits.tobytes()))
    failed = rng.random(n) < 0.01
    score = np.clip(rng.normal(0.25, 0.06, n), -1, 1).astype(np.float32)
    index = np.arange(n, dtype=np.int32)
    columns = {
        "uid": uid,
        "key": pa.array(index).cast(pa.string()),
        "shard": pa.repeat(pa.scalar(shard), n),
        "index": pa.array(index),
        "score": pa.array(score, mask=failed),
        "caption_chars": pa.array(rng.integers(0, 200, n, dtype=np.int32)),
        "caption_words": pa.array(rng.integers(0, 30, n, dtype=np.int32)),
        "width": pa.array(rng.integers(32, 2048, n, dtype=np.int32)),
        "height": pa.array(rng.integers(32, 2048, n, dtype=np.int32)),
        "error": pa.array(np.where(failed, "decode_error", None).tolist(), type=pa.string()),
    }
    return pa.table(columns, schema=SCHEMA)


def ensure_tables(count: int, rows: int) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    folder = OUT / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    start, made = time.time(), 0
    for i in range(count):
        path = folder / f"{i:05d}.parquet"
        if not (path.exists() and pq.ParquetFile(path).metadata.num_rows == rows):
            pq.write_table(make_table(np.random.default_rng(i), rows, f"pool/{i:05d}.tar"), path)
            made += 1
    print(json.dumps({"written": made, "reused": count - made, "seconds": round(time.time() - start, 1)}))


def scores_folder(paths: list[Path], rows: int) -> Path:
    folder = OUT / f"scores-{len(paths) * rows}"
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for path in paths:
        link = folder / path.name
        if not link.exists():
            link.symlink_to(path)
        shards.append({"url": f"pool/{path.stem}.tar", "table": path.name, "rows": rows, "scored": None,
                       "failed": {}, "image_embeddings": None})
    manifest = {"format": "vlp-scores/1", "pool": "simulated", "model": {"name": "none"}, "shards": shards,
                "eval_sets": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


PEAK = """
import json as _json
with open("/proc/self/status") as _f:
    print(_json.dumps({"vm_hwm_mb": round(int(next(l for l in _f if l.startswith("VmHWM")).split()[1]) / 1024, 1)}))
"""


def run_child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; its wall time, peak RSS, and what it printed as JSON lines.

    Two peaks: ``ru_maxrss`` from ``os.wait4``, which Linux carries over from the process image before ``exec``
    (the forking parent's size, so this parent stays small), and the child's own ``VmHWM``, read at its end."""
    start = time.time()
    child = subprocess.Popen([sys.executable, "-c", code + PEAK], cwd=REPO, stdout=subprocess.PIPE, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise RuntimeError(f"child failed ({status}): {code}")
    result = {}
    for line in output.splitlines():
        if line.startswith("{"):
            result.update(json.loads(line))
    return {"seconds": round(time.time() - start, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), **result}


FILTER = """
import json
from vlp.filtering.select import filter_scores
r = filter_scores({scores!r}, {rules!r}, {out!r}, samples=0, progress=False)
print(json.dumps({{"pool_rows": r["pool_rows"], "kept": r["kept"], "cut": r["per_rule"][0]["cut"]}}))
"""

def baseline_code(paths: list[Path]) -> str:
    # DataComp's get_threshold: all scores in memory, one sort; then each table's uids selected by ">= cut"
    return f"""
import json
import numpy as np, pyarrow.compute as pc, pyarrow.parquet as pq
paths = {[str(p) for p in paths]!r}
parts, rows = [], 0
for p in paths:
    t = pq.read_table(p, columns=["score", "error"])
    rows += t.num_rows
    t = t.filter(pc.and_(pc.is_valid(t["score"]), pc.is_null(t["error"])))
    parts.append(t["score"].to_numpy())
scores = np.concatenate(parts)
del parts
cut = float(-np.sort(-scores)[int(len(scores) * 0.3)])
kept = []
for p in paths:
    t = pq.read_table(p, columns=["uid", "score", "error"])
    t = t.filter(pc.and_(pc.greater_equal(t["score"], cut), pc.is_null(t["error"])))
    kept.append(np.array([(int(u[:16], 16), int(u[16:], 16)) for u in t["uid"].to_pylist()], np.dtype("u8,u8")))
kept = np.unique(np.concatenate(kept))
print(json.dumps({{"pool_rows": rows, "kept": len(kept), "cut": cut}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1e7,3e7,1e8", help="pool rows, comma-separated")
    parser.add_argument("--rows-per-file", type=float, default=1e6)
    parser.add_argument("--baseline", type=float, default=1e7, help="rows for the exact-sort baseline (0: none)")
    args = parser.parse_args()
    per_file = int(args.rows_per_file)
    sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    files = max(sizes + [int(args.baseline)]) // per_file
    # generated in a child, so that this process stays small (see run_child)
    made = run_child(f"import sys; sys.argv = ['x']; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); "
                     f"import select_memory; select_memory.ensure_tables({files}, {per_file})")
    generation = made["seconds"]
    print(f"tables: {made['written']} written, {made['reused']} reused, {generation:.0f}s", flush=True)
    paths = [OUT / "tables" / f"{i:05d}.parquet" for i in range(files)]

    results = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
               "generation_seconds": round(generation, 1), "rows_per_file": per_file, "runs": []}
    floor = run_child("import json, numpy, pyarrow.parquet, matplotlib.figure, vlp.filtering.select; print('{}')")
    results["import_floor_mb"] = floor["vm_hwm_mb"]
    print(f"interpreter with the imports: {floor['vm_hwm_mb']} MB", flush=True)
    for size in sizes:
        scores = scores_folder(paths[:size // per_file], per_file)
        for rules in (["score_top=0.3", "caption_words>=2"], ["score_top=0.001", "caption_words>=2"]):
            out = OUT / f"selection-{size}-{rules[0]}"
            r = run_child(FILTER.format(scores=str(scores), rules=rules, out=str(out)))
            r.update(tool="filter_scores", rules=rules, uid_mb=round(16 * r["kept"] / 2**20, 1))
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
    if args.baseline:
        r = run_child(baseline_code(paths[:int(args.baseline) // per_file]))
        r.update(tool="full sort (DataComp get_threshold)", rules=["score_top=0.3"],
                 uid_mb=round(16 * r["kept"] / 2**20, 1))
        results["runs"].append(r)
        print(json.dumps(r), flush=True)
        same = [x for x in results["runs"] if x["tool"] == "filter_scores" and x["pool_rows"] == r["pool_rows"]]
        if same:  # the baseline skips the caption rule, so only the cuts compare
            print(f"cut: full sort {r['cut']!r}, filter_scores {same[0]['cut']!r}", flush=True)

    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nCPU: {results['cpu']} ({results['cores']} cores), Python {results['python']}; "
          f"generating {files} tables of {per_file:,} rows: {generation:.0f}s; "
          f"imports alone: {floor['vm_hwm_mb']} MB")
    print("| tool | pool rows | rules | kept | kept uids x 16 B | peak RSS (VmHWM) | ru_maxrss | wall |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in results["runs"]:
        print(f"| {r['tool']} | {r['pool_rows']:,} | {', '.join(r['rules'])} | {r['kept']:,} | {r['uid_mb']:,} MB | "
              f"{r['vm_hwm_mb']:,} MB | {r['peak_rss_mb']:,} MB | {r['seconds']} s |")


if __name__ == "__main__":
    main()
