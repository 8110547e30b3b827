"""Images/s of ``vlp score`` against a plain open_clip scoring loop, same shards, same model, same batch size, CPU.

    .venv/bin/python benchmarks/score_speed.py            # ~6 minutes on 2 idle cores, ~12 on 2 loaded ones
    .venv/bin/python benchmarks/score_speed.py --quick    # under a minute: one round, small pools, a check only
    .venv/bin/python benchmarks/score_speed.py --profile  # also where vlp score's time goes (filter model)

Cases (model x pool):
- ``filter``: the data filtering network ``work/dfn-flickr8k/filter-network`` (benchmarks/dfn_proof.py trains it;
  vlp-r10t-32-t2m2: 32 px ResNet image tower, tiny text tower) on ``work/pools/flickr8k-noisy/{00000..00002}.tar``
  (3,000 samples, 64 px JPEGs);
- ``vit``: ``ViT-B-32`` with random weights (seed 0, as ``vlp score`` builds it) on the first 128 Flickr8k test
  images at their stored 160 px, written with ``vlp shards captions --per-image`` into
  ``benchmarks/out/score_speed/pools`` (one shard). The 160 px images are upscaled to 224, so fast decoding has
  nothing to skip there.

Sides, each in a fresh process, in rotating order, ``--rounds`` times (median reported):
- ``baseline``: what a user writes with open_clip: ``wds.WebDataset(urls).decode("pil").to_tuple(...)``, the
  model's own eval transform (``image_transform_v2`` of its preprocess config, as ``create_model_and_transforms``
  builds it), batches of the same size, ``encode_image`` / ``encode_text`` with ``normalize=True`` under
  ``torch.no_grad()``, cosine, (uid, score) collected. Single process, torch's default threads (all cores: what a
  user gets). The model is ``vlp.eval.models.load_model(spec).model.clip``, the open_clip model vlp scores with,
  so the comparison is of the pipelines, not the networks (``--baseline-model plain``: a fresh
  ``open_clip.create_model(name)`` holding its weights, without vlp's trimmed convolutions and channels-last image
  tower, which make the filter's image tower ~1.3x faster);
- ``baseline-t1``: the same at one torch thread (what vlp-w1 computes with): separates the pipeline's gain from
  that of not oversubscribing the cores, which is large on a loaded machine;
- ``baseline-dl1``: the same pipeline inside a torch ``DataLoader`` with one worker (decoding beside the model),
  main process at torch's default threads;
- ``vlp-w1`` / ``vlp-w1-exact`` / ``vlp-w0``: ``vlp score --workers N [--exact-decode] --batch-size B`` through the
  CLI, a fresh output folder each time, torch's default threads (every core);
- ``vlp-p2``: ``torchrun --nproc-per-node 2 -m vlp score --workers 0 --threads 1``: two scoring processes over whole
  shards, each decoding in its own thread (the CPU layout docs/filtering.md recommends).

Per side: wall time of the whole command (interpreter start, imports, model building, reading, scoring, writing)
and the rate of the scoring loop alone (baseline: first shard opened to last batch scored; vlp: the samples/s its
progress bar reports at the end, from the loader's creation to the last table written). Scores of each vlp side
are joined on uid with the baseline's: the largest |difference| is reported (exact decoding: expected < 1e-4).
Results go to ``benchmarks/out/score_speed/results.json`` and a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out" / "score_speed"
FLICKR = REPO.parent / "shared" / "data" / "flickr8k"
NOISY = REPO / "work" / "pools" / "flickr8k-noisy"
FILTER = "work/dfn-flickr8k/filter-network"
GOAL = 2.0
IMAGE_KEYS = "jpg;png;webp"


# ---------------------------------------------------------------------------------------------------- the baseline

def run_baseline(model_spec: str, pool: str, batch_size: int, loader: str, model_source: str, out: Path,
                 threads: int | None = None) -> None:
    """The plain open_clip loop; writes its scores and timings to ``out`` (JSON). ``threads``: torch's default
    unless given."""
    import open_clip
    import torch
    import webdataset as wds
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from vlp.eval.models import load_model

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)  # vlp score seeds the same way: a random-init model gets the same weights
    loaded = load_model(model_spec)
    if loaded.model.prefix is not None or loaded.model.parts:
        raise SystemExit(f"{model_spec}: has a text prefix or extra parts; the plain loop covers plain CLIP models")
    name = loaded.describe["model"]
    if model_source == "plain":
        clip = open_clip.create_model(name)
        clip.load_state_dict(loaded.model.clip.state_dict())
    else:
        clip = loaded.model.clip
    clip.eval()
    del loaded
    preprocess = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(clip)), is_train=False)
    tokenizer = open_clip.get_tokenizer(name)

    dataset = (wds.WebDataset(pool, shardshuffle=False)
               .decode("pil").to_tuple(IMAGE_KEYS, "txt", "json")
               .map_tuple(preprocess, lambda t: t, lambda m: m["uid"]))
    if loader == "plain":
        batches = _batched(dataset, batch_size)
    else:
        batches = torch.utils.data.DataLoader(dataset.batched(batch_size, collation_fn=_collate), batch_size=None,
                                              num_workers=1)
    uids, scores = [], []
    start = time.time()
    with torch.no_grad():
        for images, texts, batch_uids in batches:
            image = clip.encode_image(images, normalize=True)
            text = clip.encode_text(tokenizer(texts), normalize=True)
            scores.extend((image * text).sum(-1).tolist())
            uids.extend(batch_uids)
    seconds = time.time() - start
    out.write_text(json.dumps({"uids": uids, "scores": scores, "loop_seconds": seconds,
                               "threads": torch.get_num_threads()}))


def _collate(samples):
    import torch

    images, texts, uids = zip(*samples)
    return torch.stack(images), list(texts), list(uids)


def _batched(samples, size):
    chunk = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield _collate(chunk)
            chunk = []
    if chunk:
        yield _collate(chunk)


# ------------------------------------------------------------------------------------------------------ the sides

def side_command(side: str, case: dict, args, scratch: Path) -> tuple[list[str], Path]:
    out = scratch / f"{case['name']}-{side}"
    if side.startswith("baseline"):
        loader = "dl1" if side == "baseline-dl1" else "plain"
        threads = ["--threads", "1"] if side == "baseline-t1" else []
        return [sys.executable, __file__, "_baseline", "--model", case["model"], "--pool", case["pool"],
                "--batch-size", str(args.batch_size), "--loader", loader, "--baseline-model", args.baseline_model,
                "--result", str(out.with_suffix(".json")), *threads], out
    if side.startswith("vlp-p"):  # N scoring processes over whole shards (torchrun), each decoding inline, 1 thread
        procs = int(re.match(r"vlp-p(\d+)", side).group(1))
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port",
                "29571", "-m", "vlp", "score", "--model", case["model"], "--pool", case["pool"], "--out", str(out),
                "--workers", "0", "--threads", "1", "--device", "cpu", "--batch-size", str(args.batch_size)], out
    workers = int(re.match(r"vlp-w(\d+)", side).group(1))
    cmd = [str(Path(sys.executable).parent / "vlp"), "score", "--model", case["model"], "--pool", case["pool"],
           "--out", str(out), "--workers", str(workers), "--batch-size", str(args.batch_size)]
    if side.endswith("-exact"):
        cmd.append("--exact-decode")
    return cmd, out


def run_side(side: str, case: dict, args, scratch: Path) -> dict:
    cmd, out = side_command(side, case, args, scratch)
    shutil.rmtree(out, ignore_errors=True)  # vlp score resumes into an existing folder: start empty
    start = time.time()
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode:
        raise SystemExit(f"{side} on {case['name']} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    if side.startswith("baseline"):
        result = json.loads(out.with_suffix(".json").read_text())
        scores = dict(zip(result["uids"], result["scores"]))
        return {"wall": wall, "rate": len(scores) / result["loop_seconds"], "samples": len(scores),
                "threads": result["threads"], "scores": scores}
    import pyarrow.parquet as pq

    scores = {}
    for table in sorted(out.glob("*.parquet")):
        t = pq.read_table(table, columns=["uid", "score"]).to_pydict()
        scores.update(zip(t["uid"], t["score"]))
    if side.startswith("vlp-p"):  # the ranks' loops run side by side: their last rates add up
        last = dict(re.findall(r"score rank (\d+)[^\n\r]*?(\d+) samples/s", proc.stderr))
        rate = float(sum(int(v) for v in last.values())) if last else float("nan")
        return {"wall": wall, "rate": rate, "samples": len(scores), "threads": 1, "scores": scores}
    rates = re.findall(r"(\d+) samples/s", proc.stderr)
    return {"wall": wall, "rate": float(rates[-1]) if rates else float("nan"), "samples": len(scores),
            "threads": len(os.sched_getaffinity(0)), "scores": scores}


def compare(scores: dict, baseline: dict) -> dict:
    """Score differences joined on uid, and how much of the baseline's top 30% (DFN's kept fraction) is kept."""
    common = scores.keys() & baseline.keys()
    if len(common) != len(scores) or len(common) != len(baseline):
        raise SystemExit(f"uid sets differ: {len(scores)} vs {len(baseline)} scores, {len(common)} shared")
    uids = sorted(u for u in common if scores[u] is not None and baseline[u] is not None)
    diffs = [abs(scores[u] - baseline[u]) for u in uids]
    keep = max(1, round(0.3 * len(uids)))
    top = set(sorted(uids, key=lambda u: -scores[u])[:keep])
    top_baseline = set(sorted(uids, key=lambda u: -baseline[u])[:keep])
    return {"max_diff": max(diffs, default=float("nan")), "mean_diff": statistics.fmean(diffs) if diffs else 0.0,
            "top30_shared": len(top & top_baseline) / keep}


# ------------------------------------------------------------------------------------------------------- the pools

def larger_pool(images: int) -> str:
    """``images`` Flickr8k test images at their stored 160 px, one sample per image, written with vlp's writer."""
    folder = OUT / "pools" / f"flickr8k-160-{images}-2shards"
    spec = str(folder / "{00000..00001}.tar")  # two shards, so that two scoring processes (vlp-p2) have one each
    if (folder / "manifest.json").exists():
        return spec
    names = (FLICKR / "splits" / "test.txt").read_text().split()[:images]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as split:
        split.write("\n".join(names) + "\n")
    subprocess.run([str(Path(sys.executable).parent / "vlp"), "shards", "captions", "--images", str(FLICKR / "images"),
                    "--captions", str(FLICKR / "captions.txt"), "--split", split.name, "--per-image",
                    "--samples-per-shard", str((images + 1) // 2), "--workers", "1", "--out", str(folder),
                    "--overwrite"],
                   cwd=REPO, check=True, capture_output=True)
    os.unlink(split.name)
    return spec


def cases(args) -> list[dict]:
    found = []
    if "filter" in args.cases:
        last = 0 if args.quick else 2
        found.append({"name": "filter", "model": FILTER, "pool": str(NOISY / f"{{00000..{last:05d}}}.tar"),
                      "pool_desc": f"flickr8k-noisy, {last + 1} shards, 64 px",
                      "sides": ["baseline", "vlp-w1", "vlp-w1-exact"] if args.quick else
                               ["baseline", "baseline-t1", "baseline-dl1", "vlp-w1", "vlp-w1-exact", "vlp-w0",
                                "vlp-p2"]})
    if "vit" in args.cases:
        images = 32 if args.quick else 128
        found.append({"name": "vit", "model": "ViT-B-32", "pool": larger_pool(images),
                      "pool_desc": f"flickr8k test, {images} images, 160 px",
                      "sides": ["baseline", "vlp-w1-exact"] if args.quick else
                               ["baseline", "baseline-t1", "vlp-w1", "vlp-w1-exact", "vlp-p2"]})
    return found


# --------------------------------------------------------------------------------------------------------- profile

def profile(batches: int = 4, batch_size: int = 256) -> dict:
    """Seconds per stage of vlp score's work on the filter model, in this process, one thread, no worker: decode
    (fast and exact), tokenizer, image tower, text tower (packed), parquet writing."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from vlp.data import ImageDecoder
    from vlp.data.shards import iter_raw_samples
    from vlp.eval.images import image_options, normalize
    from vlp.eval.models import load_model
    from vlp.filtering import score
    from vlp.filtering.table import SCHEMA

    torch.set_num_threads(1)
    model = load_model(FILTER)
    score._use_packed_text(model)
    samples = []
    for s in iter_raw_samples(str(NOISY / "00000.tar")):
        samples.append(s)
        if len(samples) == batches * batch_size:
            break
    times: dict[str, float] = {}

    @contextmanager
    def clock(key):
        t = time.perf_counter()
        yield
        times[key] = times.get(key, 0.0) + time.perf_counter() - t

    with torch.inference_mode():
        for i in range(batches):
            chunk = samples[i * batch_size:(i + 1) * batch_size]
            with clock("rows (json, image header)"):
                rows = [score._row(s, "x") for s in chunk]
            for fast in (False, True):
                opts = image_options(model.preprocess, fast)
                decoder = ImageDecoder(opts)
                with clock(f"decode {'fast' if fast else 'exact'} (worker)"):
                    images = torch.stack([decoder(s["jpg"], None) for s in chunk])
            captions = [score._caption(s) for s in chunk]
            with clock("normalize"):
                x = normalize(images, opts.mean, opts.std)
            with clock("image tower"):
                image = model.model.encode_image(x, normalize=True)
            with clock("tokenizer"):
                tokens = model.tokenizer(captions)
            with clock("text tower (packed)"):
                text = model.model.encode_text(tokens, normalize=True)
            for r, s in zip(rows, (image * text).sum(-1).tolist()):
                r["score"] = s
            with clock("parquet"):
                pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), io.BytesIO())
    n = batches * batch_size
    return {k: {"seconds": round(v, 3), "us_per_sample": round(1e6 * v / n, 1)} for k, v in times.items()}


# -------------------------------------------------------------------------------------------------------- the main

def host() -> dict:
    import torch

    lscpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", lscpu)
    return {"cpu": model.group(1).strip() if model else platform.processor(),
            "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "torch_default_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def markdown(results: list[dict], info: dict, rounds: int) -> str:
    header = (f"CPU: {info['cpu']} ({info['cores']} cores), torch {info['torch']}; baseline at torch's default "
              f"{info['torch_default_threads']} threads, vlp at torch's default too (vlp-p2: 1 per process); "
              f"load average at start "
              f"{', '.join(f'{x:.1f}' for x in info['load_average'])}; median of {rounds} round(s).")
    columns = ("| model | pool | side | threads | samples | wall s | loop img/s | x baseline (loop) "
               "| x baseline (wall) | max abs(score - baseline) | mean abs | top-30% shared |")
    lines = [header, "", columns,
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in results:
        base = case["sides"]["baseline"]
        for side, r in case["sides"].items():
            lines.append(f"| {case['model']} | {case['pool_desc']} | {side} | {r['threads']} | {r['samples']} | "
                         f"{r['wall']:.1f} | {r['rate']:.0f} | {r['rate'] / base['rate']:.2f} | "
                         f"{base['wall'] / r['wall']:.2f} | "
                         + ("- | - | - |" if side == "baseline" else
                            f"{r['max_diff']:.2e} | {r['mean_diff']:.2e} | {100 * r['top30_shared']:.1f}% |"))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one round on small pools (a check, not a measurement)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cases", nargs="*", default=["filter", "vit"], choices=["filter", "vit"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--baseline-model", choices=["vlp", "plain"], default="vlp",
                   help="vlp: load_model(spec).model.clip, the very model vlp scores with (trimmed convolutions, "
                        "channels-last image tower); plain: a fresh open_clip.create_model holding its weights")
    p.add_argument("--profile", action="store_true", help="also time vlp score's stages on the filter model")
    args = p.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    info = host()
    print(json.dumps(info), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="score_speed-") as tmp:
        for case in cases(args):
            runs = {side: [] for side in case["sides"]}
            for r in range(rounds):
                order = case["sides"][r % len(case["sides"]):] + case["sides"][:r % len(case["sides"])]
                for side in order:
                    runs[side].append(run_side(side, case, args, Path(tmp)))
                    last = runs[side][-1]
                    print(f"{case['name']} round {r + 1} {side}: wall {last['wall']:.1f}s, "
                          f"loop {last['rate']:.0f} samples/s", flush=True)
            base_scores = runs["baseline"][0]["scores"]
            sides = {}
            for side, rs in runs.items():
                sides[side] = {"wall": statistics.median(x["wall"] for x in rs),
                               "rate": statistics.median(x["rate"] for x in rs),
                               "walls": [round(x["wall"], 2) for x in rs], "rates": [round(x["rate"], 1) for x in rs],
                               "samples": rs[0]["samples"], "threads": rs[0]["threads"],
                               **compare(rs[0]["scores"], base_scores)}
            results.append({**{k: case[k] for k in ("name", "model", "pool", "pool_desc")}, "sides": sides})
    report = {"host": info, "rounds": rounds, "batch_size": args.batch_size, "baseline_model": args.baseline_model,
              "cases": results}
    if args.profile:
        report["profile"] = profile()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / ("results-quick.json" if args.quick else "results.json")).write_text(json.dumps(report, indent=1))
    print()
    print(markdown(results, info, rounds))
    if args.profile:
        print("\nvlp score stages, filter model, 1 thread, in process (us/sample):")
        for k, v in report["profile"].items():
            print(f"- {k}: {v['us_per_sample']}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_baseline":
        b = argparse.ArgumentParser()
        b.add_argument("_baseline")
        for flag in ("--model", "--pool", "--loader", "--baseline-model", "--result"):
            b.add_argument(flag, required=True)
        b.add_argument("--batch-size", type=int, required=True)
        b.add_argument("--threads", type=int)
        a = b.parse_args()
        run_baseline(a.model, a.pool, a.batch_size, a.loader, a.baseline_model, Path(a.result), a.threads)
        sys.exit(0)
    sys.exit(main())
