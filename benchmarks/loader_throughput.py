"""Loader throughput on Flickr8k shards: vlp's ShardStream/Loader against open_clip_train's get_wds_dataset.

    .venv/bin/python benchmarks/loader_throughput.py            # 5-8 minutes on 2 cores
    .venv/bin/python benchmarks/loader_throughput.py --smoke    # a minute: 2 shards, 32 px, 1 worker
    .venv/bin/python benchmarks/loader_throughput.py --profile  # adds a cProfile of one worker-less vlp pass

What it does:
1. writes the Flickr8k train split (30,000 samples, one per caption) into ``benchmarks/out/flickr8k-train`` if
   missing; every run reads the first ``--shards`` of them (default 10 = 10,000 samples, one pass);
2. installs webdataset 0.2.86 into ``benchmarks/out/wds0286`` (pip ``--target``, nothing else changes): open_clip_train
   3.3.0's own pipeline fails on webdataset 1.x (``KeyError: 'fname'``; probed and recorded by every run);
3. for each output size x worker count, runs open_clip's loader, vlp's loader (draft decoding, its default) and
   vlp's loader with full decoding, each in a fresh subprocess, in an order that rotates between settings so that
   drift on a shared machine falls on every tool; the page cache is warmed first;
4. checks that the outputs are equivalent over the whole pass (shapes, dtype, per-channel mean/std, tokens);
5. measures pixel differences on identical crop boxes: draft vs full decoding, and vlp's full decoding vs open_clip's
   own torchvision transform; the crop-size distribution of each; and the CPU cost of each step on one core;
6. prints a Markdown table and writes ``benchmarks/out/loader_throughput.{json,md}``.

Timing: from creating the batch iterator to receiving the last batch, so worker start-up and filling the shuffle
buffer count; samples/s = samples delivered / that time. Both tools deliver the same number of samples: open_clip's
``train_num_samples`` is set to the full batches its workers can make without wrapping around, and vlp drops its
last partial batch. Batch 256. Shuffling: open_clip shuffles shard order (buffer 2000) and samples (buffer 5000,
initial 1000), vlp permutes the shard order and shuffles samples in a 5000-sample buffer; both buffer raw samples
and decode after the shuffle. DataLoader prefetch: open_clip's WebLoader uses torch's default (2), vlp's Loader its
default (4). The main process computes statistics of every batch for the equivalence check (about 0.03 ms per
sample at 32 px, 0.08 at 64 px, the same for both tools, so it lowers vlp's ratio slightly).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WDS_VERSION = "0.2.86"
BATCH = 256
SAMPLES_PER_SHARD = 1000
SHUFFLE_BUFFER = 5000  # open_clip_train's _SAMPLE_SHUFFLE_SIZE
TOOLS = ("open_clip", "vlp", "vlp_full")
TOOL_NAMES = {"open_clip": "open_clip", "vlp": "vlp (draft)", "vlp_full": "vlp (full decode)"}
GOAL = 1.5
LOADER_FILES = ("vlp/data/stream.py", "vlp/data/preprocess.py", "vlp/data/shards.py")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- preparation ---------------------------------------------------------------------------------------------------
def ensure_shards(data: Path, out: Path) -> Path:
    shards = out / "flickr8k-train"
    if (shards / "manifest.json").exists():
        return shards
    from vlp.data import WriterOptions, sources, write_shards
    from vlp.data.writer import format_report

    flickr = data / "flickr8k"
    if not flickr.is_dir():
        sys.exit(f"{flickr} not found: pass --data <folder holding flickr8k/>")
    log(f"writing Flickr8k train shards into {shards}")
    items = sources.caption_file(flickr / "images", flickr / "captions.txt", flickr / "splits" / "train.txt",
                                 source="flickr8k")
    manifest = write_shards(items, shards, WriterOptions(samples_per_shard=SAMPLES_PER_SHARD, workers=2),
                            source="flickr8k", progress=False)
    log(format_report(manifest, shards))
    return shards


def ensure_webdataset(out: Path) -> Path:
    target = out / f"wds{WDS_VERSION.replace('.', '')}"
    if not (target / f"webdataset-{WDS_VERSION}.dist-info").is_dir():
        log(f"installing webdataset=={WDS_VERSION} into {target} (private folder, the venv is not touched)")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        f"webdataset=={WDS_VERSION}"], check=True)
    return target


def warm_page_cache(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 22):
                pass


# -- one measured pass (runs in a child process) -----------------------------------------------------------------
def open_clip_loader(spec: str, size: int, workers: int, samples: int, tokenizer):
    """open_clip_train's training loader; it yields (images, tokens) tuples."""
    import open_clip
    from open_clip_train.data import get_wds_dataset

    args = argparse.Namespace(train_data=spec, val_data=None, train_num_samples=samples, dataset_resampled=False,
                              train_data_upsampling_factors=None, seed=0, batch_size=BATCH, world_size=1,
                              workers=workers)
    preprocess = open_clip.image_transform(size, is_train=True, mean=open_clip.OPENAI_DATASET_MEAN,
                                           std=open_clip.OPENAI_DATASET_STD)
    return get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer).dataloader


def vlp_loader(spec: str, size: int, workers: int, draft: bool, tokenizer):
    """vlp's Loader; it yields batch dicts."""
    from vlp.data import ImageOptions, Loader, ShardStream, StreamOptions

    opts = StreamOptions(batch_size=BATCH, shuffle_buffer=SHUFFLE_BUFFER, seed=0, drop_last=True,
                         image=ImageOptions(size=size, train=True, draft=draft))
    return Loader(ShardStream(spec, opts, tokenizer), workers=workers)


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have been waited for (the DataLoader workers, once
    joined). Other processes on a shared machine inflate wall time much more than this."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(tool: str, spec: str, size: int, workers: int, samples: int) -> dict:
    """One pass; returns timing plus statistics of everything delivered (for the equivalence check)."""
    import gc

    import open_clip
    import torch
    import webdataset

    import vlp.models  # noqa: F401 - registers the vlp-tiny-* configs, hence their tokenizers

    # The statistics below run in the main process beside the workers; torch's second intra-op thread would only
    # contend with them for 2 cores (DataLoader workers already run with one thread each).
    torch.set_num_threads(1)
    tokenizer = open_clip.get_tokenizer(f"vlp-tiny-{size}")
    if tool == "open_clip":
        loader, unpack = open_clip_loader(spec, size, workers, samples, tokenizer), tuple
    else:
        loader, unpack = vlp_loader(spec, size, workers, tool == "vlp", tokenizer), lambda b: (b["image"], b["text"])
    count, tokens, first = 0, 0, None
    channel_sum = torch.zeros(3, dtype=torch.float64)
    channel_sq = torch.zeros(3, dtype=torch.float64)
    lo, hi = math.inf, -math.inf
    cpu_start, start = cpu_seconds(), time.perf_counter()
    for batch in loader:
        images, text = unpack(batch)
        if first is None:
            first = time.perf_counter() - start
            shapes = {"image": list(images.shape[1:]), "image_dtype": str(images.dtype),
                      "text": list(text.shape[1:]), "text_dtype": str(text.dtype), "batch": images.shape[0]}
        count += images.shape[0]
        channel_sum += images.sum(dim=(0, 2, 3), dtype=torch.float64)
        channel_sq += (images * images).sum(dim=(0, 2, 3), dtype=torch.float64)
        lo, hi = min(lo, images.min().item()), max(hi, images.max().item())
        tokens += int((text != 0).sum())
    seconds = time.perf_counter() - start
    del loader, batch  # open_clip's workers are persistent: dropping the loader joins them, so their CPU counts
    gc.collect()
    cpu = cpu_seconds() - cpu_start
    pixels = count * images.shape[2] * images.shape[3]
    mean = channel_sum / pixels
    return {"tool": tool, "size": size, "workers": workers, "samples": count, "seconds": seconds,
            "samples_per_s": count / seconds, "first_batch_s": first, "cpu_ms_per_sample": 1000 * cpu / count, **shapes,
            "channel_mean": mean.tolist(), "channel_std": (channel_sq / pixels - mean ** 2).sqrt().tolist(),
            "min": lo, "max": hi, "tokens_per_caption": tokens / count, "webdataset": webdataset.__version__}


def run_child(tool: str, spec: str, size: int, workers: int, samples: int, wds_path: Path | None,
              timeout: int = 900) -> dict:
    env = dict(os.environ)
    paths = [str(wds_path)] if wds_path else []  # first, so that it shadows the venv's webdataset
    paths += [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", tool, "--spec", spec, "--size", str(size),
           "--workers", str(workers), "--samples", str(samples)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        error = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"tool": tool, "size": size, "workers": workers, "error": error, "stderr_tail": proc.stderr[-3000:]}
    return json.loads(lines[-1][len("RESULT "):])


# -- pixel differences on identical crop boxes -------------------------------------------------------------------
def distinct_images(shard_dir: Path, n: int) -> list[bytes]:
    from vlp.data import iter_raw_samples

    seen, images = set(), []
    for shard in sorted(shard_dir.glob("*.tar")):
        for sample in iter_raw_samples(str(shard)):
            name = json.loads(sample["json"])["image"]
            if name not in seen:
                seen.add(name)
                images.append(sample["jpg"])
                if len(images) == n:
                    return images
    return images


class Diff:
    """Mean/max absolute difference and PSNR in 0..255 units, accumulated over images."""

    def __init__(self):
        self.abs_sum, self.sq_sum, self.max, self.n = 0.0, 0.0, 0.0, 0

    def add(self, a, b) -> None:
        d = (a.double() - b.double()).abs()
        self.abs_sum += float(d.sum())
        self.sq_sum += float((d * d).sum())
        self.max = max(self.max, float(d.max()))
        self.n += d.numel()

    def result(self) -> dict:
        mse = self.sq_sum / self.n
        return {"mean_abs": self.abs_sum / self.n, "max_abs": self.max,
                "psnr_db": math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)}


def pixel_differences(images: list[bytes], size: int) -> dict:
    import numpy as np
    import open_clip
    import torch
    import torchvision.transforms.functional as TF
    from PIL import Image
    from torchvision.transforms import RandomResizedCrop

    from vlp.data import ImageDecoder, ImageOptions
    from vlp.data.preprocess import normalize_batch, random_resized_crop_box

    full_opts, draft_opts = ImageOptions(size=size, draft=False), ImageOptions(size=size, draft=True)
    full, draft = ImageDecoder(full_opts), ImageDecoder(draft_opts)
    need = math.ceil(size / draft.min_crop)  # the draft request vlp's decoder makes
    transform = open_clip.image_transform(size, is_train=True, mean=open_clip.OPENAI_DATASET_MEAN,
                                          std=open_clip.OPENAI_DATASET_STD)
    crop, rest = transform.transforms[0], transform.transforms[1:]
    assert isinstance(crop, RandomResizedCrop), transform
    mean = torch.tensor(full_opts.mean).view(3, 1, 1) * 255
    std = torch.tensor(full_opts.std).view(3, 1, 1) * 255

    diffs = {k: Diff() for k in ("draft_same_box", "open_clip_vs_vlp_full", "open_clip_vs_vlp_full_interior")}
    draft_scale = []
    for i, data in enumerate(images):
        reference = full(data, random.Random(i))
        src = Image.open(io.BytesIO(data)).convert("RGB")
        box = random_resized_crop_box(*src.size, full_opts.scale, full_opts.ratio, random.Random(i))
        # The draft decode on the very same box, in the drafted image's coordinates.
        small = Image.open(io.BytesIO(data))
        small.draft("RGB", (need, need))
        small = small.convert("RGB")
        factor = small.width / src.width
        draft_scale.append(factor)
        same_box = small.resize((size, size), Image.BICUBIC, box=tuple(c * factor for c in box))
        diffs["draft_same_box"].add(torch.from_numpy(np.asarray(same_box).copy()).permute(2, 0, 1), reference)
        # open_clip's transform with torchvision's crop forced onto the same box, then compared after normalisation.
        left, top, right, bottom = box
        x = TF.resized_crop(src, top, left, bottom - top, right - left, list(crop.size), crop.interpolation,
                            antialias=crop.antialias)
        for t in rest:
            x = t(x)
        ours = normalize_batch(reference[None], full_opts.mean, full_opts.std)[0]
        x, ours = x * std + mean, ours * std + mean
        diffs["open_clip_vs_vlp_full"].add(x, ours)
        # PIL's resize(box=...) lets the bicubic kernel read pixels just outside the box; crop-then-resize does not.
        diffs["open_clip_vs_vlp_full_interior"].add(x[:, 2:-2, 2:-2], ours[:, 2:-2, 2:-2])
    result = {k: d.result() for k, d in diffs.items()}
    result["draft_scale"] = sorted(set(draft_scale))
    return result


def stage_costs(shard: Path, size: int, repeats: int = 3) -> dict:
    """CPU microseconds per sample of each step, on one core, best of ``repeats``, over the samples of one shard:
    vlp's steps through its own functions, open_clip's per-sample steps as its pipeline runs them."""
    import open_clip
    import torch
    from PIL import Image

    import vlp.models  # noqa: F401
    from vlp.data import ImageDecoder, ImageOptions, iter_raw_samples
    from vlp.data.preprocess import normalize_batch, parse_sample

    torch.set_num_threads(1)  # as in a DataLoader worker
    raws = list(iter_raw_samples(str(shard)))
    parsed = [parse_sample(r, True, "first", random.Random(0)) for r in raws]
    texts = [p["text"] for p in parsed]
    tokenizer = open_clip.get_tokenizer(f"vlp-tiny-{size}")
    opts = ImageOptions(size=size)
    full, draft = ImageDecoder(ImageOptions(size=size, draft=False)), ImageDecoder(opts)
    transform = open_clip.image_transform(size, is_train=True, mean=open_clip.OPENAI_DATASET_MEAN,
                                          std=open_clip.OPENAI_DATASET_STD)
    uint8 = [draft(p["image"], random.Random(i)) for i, p in enumerate(parsed)]
    floats = [transform(Image.open(io.BytesIO(p["image"])).convert("RGB")) for p in parsed]

    def pil_rgb(data):  # webdataset's "pilrgb" decoder
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")

    steps = {
        "tar read + group (vlp iter_raw_samples)": lambda: list(iter_raw_samples(str(shard))),
        "parse sample (vlp: json, text)": lambda: [parse_sample(r, True, "first", random.Random(0)) for r in raws],
        "vlp image, draft decode + crop + resize": lambda: [draft(p["image"], random.Random(i))
                                                            for i, p in enumerate(parsed)],
        "vlp image, full decode + crop + resize": lambda: [full(p["image"], random.Random(i))
                                                           for i, p in enumerate(parsed)],
        "open_clip image, pilrgb decode": lambda: [pil_rgb(p["image"]) for p in parsed],
        "open_clip image, decode + transform": lambda: [transform(pil_rgb(p["image"])) for p in parsed],
        "tokenize, per batch of 256 (vlp)": lambda: [tokenizer(texts[i:i + BATCH])
                                                     for i in range(0, len(texts), BATCH)],
        "tokenize, per sample (open_clip)": lambda: [tokenizer(t)[0] for t in texts],
        "collate: stack + normalise uint8 (vlp)": lambda: [
            normalize_batch(torch.stack(uint8[i:i + BATCH]), opts.mean, opts.std) for i in range(0, len(uint8), BATCH)],
        "collate: stack float (open_clip)": lambda: [torch.stack(floats[i:i + BATCH])
                                                     for i in range(0, len(floats), BATCH)],
    }
    costs = {}
    for name, fn in steps.items():
        best = math.inf
        for _ in range(repeats):
            start = time.process_time()
            fn()
            best = min(best, time.process_time() - start)
        costs[name] = 1e6 * best / len(raws)
    return costs


def crop_geometry(grids: list[int], draws: int = 20000) -> dict:
    """Crop boxes drawn on a square image of each side in ``grids``, by vlp (seeded ``random.Random``) and by
    torchvision's RandomResizedCrop on the 160 px source. The smaller grids show how coarse the augmentation would be
    if a box were drawn on a drafted image's pixels; vlp's draft path draws it on the stored size instead."""
    import torch
    from torchvision.transforms import RandomResizedCrop

    from vlp.data.preprocess import ImageOptions, random_resized_crop_box

    opts = ImageOptions()
    torch.manual_seed(0)
    stats = {}
    for name, side in [("torchvision", 160)] + [("vlp", g) for g in grids]:
        rng, canvas = random.Random(0), torch.empty(3, side, side)
        area, aspect, sizes = [], [], set()
        for _ in range(draws):
            if name == "vlp":
                left, top, right, bottom = random_resized_crop_box(side, side, opts.scale, opts.ratio, rng)
                w, h = right - left, bottom - top
            else:
                _, _, h, w = RandomResizedCrop.get_params(canvas, list(opts.scale), list(opts.ratio))
            area.append(w * h / side ** 2)
            aspect.append(w / h)
            sizes.add((w, h))
        stats[f"{name} on {side}x{side}"] = {"mean_area": sum(area) / draws, "mean_aspect": sum(aspect) / draws,
                                             "distinct_sizes": len(sizes), "offset_step_source_px": 160 / side}
    return stats


# -- report ----------------------------------------------------------------------------------------------------
def fmt_stats(r: dict) -> str:
    mean = "/".join(f"{v:+.3f}" for v in r["channel_mean"])
    std = "/".join(f"{v:.3f}" for v in r["channel_std"])
    return f"{mean} | {std}"


def markdown(report: dict) -> str:
    rows = report["throughput"]
    lines = [f"Machine: {report['machine']['cpus']} CPU cores, no GPU ({report['machine']['platform']}); "
             f"load average before/after: {report['load_before']} / {report['load_after']}.",
             f"vlp at commit {report['vlp_commit']} (its loader, {', '.join(LOADER_FILES)}, last changed in "
             f"{report['vlp_loader_commit']})"
             + (f", vlp/data with uncommitted changes: {', '.join(report['vlp_data_uncommitted'])}"
                if report["vlp_data_uncommitted"] else "") + ".",
             f"Samples per setting: {report['samples']:,} (first {report['shards']} Flickr8k train shards, one pass), "
             f"batch {BATCH}.", "",
             "Wall-clock throughput (samples/s; ratio = vlp / open_clip):", "",
             "| size | workers | open_clip | vlp (draft) | ratio | vlp (full decode) | ratio |",
             "|---|---|---|---|---|---|---|"]
    lines += table(rows, "samples_per_s", "{:,.0f}", lambda vlp, oc: vlp / oc)
    for tool in ("vlp", "vlp_full"):
        ratios = [t[tool]["samples_per_s"] / t["open_clip"]["samples_per_s"] for t in group(rows).values()
                  if "samples_per_s" in t.get(tool, {}) and "samples_per_s" in t.get("open_clip", {})]
        lines += ["", f"{TOOL_NAMES[tool]} reaches the goal of {GOAL}x open_clip's samples/s in "
                      f"{sum(r >= GOAL for r in ratios)} of {len(ratios)} settings."]
    lines += ["", "CPU time per sample, main process and workers together (ms; ratio = open_clip / vlp; other load "
              "on the machine inflates it less than wall time, but it still grows with cache and core sharing):", "",
              "| size | workers | open_clip | vlp (draft) | ratio | vlp (full decode) | ratio |",
              "|---|---|---|---|---|---|---|"]
    lines += table(rows, "cpu_ms_per_sample", "{:.2f}", lambda vlp, oc: oc / vlp)
    lines += ["", "Equivalence over each whole pass (per-channel mean | std of the normalised images; tokens per "
              "caption = non-padding tokens):", "",
              "| size | workers | tool | samples | image | text | mean R/G/B | std R/G/B | min..max | tokens/caption "
              "| first batch s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['workers']} | {TOOL_NAMES[r['tool']]} | error: {r['error']} "
                         "| | | | | | | |")
            continue
        lines.append(f"| {r['size']} | {r['workers']} | {TOOL_NAMES[r['tool']]} | {r['samples']:,} | "
                     f"{'x'.join(map(str, r['image']))} {r['image_dtype'].replace('torch.', '')} | "
                     f"{'x'.join(map(str, r['text']))} {r['text_dtype'].replace('torch.', '')} | {fmt_stats(r)} | "
                     f"{r['min']:.2f}..{r['max']:.2f} | {r['tokens_per_caption']:.2f} | {r['first_batch_s']:.1f} |")
    n = report["pixel_images"]
    lines += ["", f"Pixel differences on identical crop boxes ({n} distinct images, 0..255 units; "
              "draft = PIL JPEG DCT-scaled decoding):", "",
              "| size | comparison | mean abs | max abs | PSNR dB |", "|---|---|---|---|---|"]
    labels = {"draft_same_box": "vlp draft vs full decode, same box",
              "open_clip_vs_vlp_full": "vlp full decode vs open_clip's torchvision transform, same box",
              "open_clip_vs_vlp_full_interior": "the same, 2-px border excluded"}
    for size, res in report["pixels"].items():
        for key, label in labels.items():
            d = res[key]
            lines.append(f"| {size} px | {label} | {d['mean_abs']:.2f} | {d['max_abs']:.1f} | {d['psnr_db']:.1f} |")
    scales = ", ".join(f"1/{round(1 / s)} at {k} px" for k, r in report["pixels"].items() for s in r["draft_scale"])
    lines += ["", f"CPU cost per sample on one core (microseconds, best of 3 over the {report['stage_samples']:,} "
              f"samples of one shard; draft scale {scales}):",
              "", "| step | " + " | ".join(f"{k} px" for k in report["stages"]) + " |",
              "|---|" + "---|" * len(report["stages"])]
    for step in next(iter(report["stages"].values())):
        lines.append(f"| {step} | " + " | ".join(f"{c[step]:,.0f}" for c in report["stages"].values()) + " |")
    lines += ["", "Crop geometry, 20,000 draws each (a 160 px source; vlp's draft path draws on the drafted grid):", "",
              "| drawn by | mean area fraction | mean aspect | distinct crop sizes | offset step (source px) |",
              "|---|---|---|---|---|"]
    for name, g in report["crop_geometry"].items():
        lines.append(f"| {name} | {g['mean_area']:.4f} | {g['mean_aspect']:.4f} | {g['distinct_sizes']} | "
                     f"{g['offset_step_source_px']:g} |")
    probe = report["webdataset_1x_probe"]
    lines += ["", f"open_clip_train's pipeline with webdataset {probe['webdataset']} (the venv's): "
              + (f"fails with `{probe['error']}`." if "error" in probe else "works.")]
    return "\n".join(lines) + "\n"


def table(rows: list[dict], key: str, fmt: str, ratio) -> list[str]:
    lines = []
    for (size, workers), by_tool in group(rows).items():
        oc = by_tool.get("open_clip", {})
        cells = [f"{size} px", str(workers), fmt.format(oc[key]) if key in oc else oc.get("error", "-")]
        for tool in ("vlp", "vlp_full"):
            r = by_tool.get(tool, {})
            cells.append(fmt.format(r[key]) if key in r else r.get("error", "-"))
            cells.append(f"{ratio(r[key], oc[key]):.2f}x" if key in r and key in oc else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def group(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault((r["size"], r["workers"]), {})[r["tool"]] = r
    return out


def profile_vlp(spec: str, size: int, out: Path) -> None:
    import cProfile
    import pstats

    import open_clip

    import vlp.models  # noqa: F401

    loader = vlp_loader(spec, size, 0, True, open_clip.get_tokenizer(f"vlp-tiny-{size}"))
    profiler = cProfile.Profile()
    profiler.enable()
    count = sum(batch["image"].shape[0] for batch in loader)
    profiler.disable()
    path = out / f"loader_profile_{size}px.txt"
    with open(path, "w") as f:
        stats = pstats.Stats(profiler, stream=f)
        f.write(f"vlp loader, no workers, {size} px, {count} samples\n")
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(30)
    log(f"profile written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    parser.add_argument("--shards", type=int, default=10, help="Flickr8k train shards per pass (1,000 samples each)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pixel-images", type=int, default=500)
    parser.add_argument("--smoke", action="store_true", help="2 shards, 32 px, 1 worker, 50 images")
    parser.add_argument("--profile", action="store_true", help="also cProfile one worker-less vlp pass per size")
    parser.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = measure(args.child, args.spec, args.size, args.workers[0], args.samples)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.smoke:
        args.shards, args.sizes, args.workers, args.pixel_images = 2, [32], [1], 50

    load_before = "/".join(f"{x:.2f}" for x in os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    shard_dir = ensure_shards(args.data, args.out)
    wds_path = ensure_webdataset(args.out)
    tars = sorted(shard_dir.glob("*.tar"))[:args.shards]
    if len(tars) < args.shards or args.shards % max(args.workers):
        sys.exit(f"need {args.shards} shards divisible by every worker count; have {len(tars)}")
    spec = str(shard_dir / f"{{00000..{args.shards - 1:05d}}}.tar")
    total = args.shards * SAMPLES_PER_SHARD

    probe = run_child("open_clip", str(tars[0]), 32, 0, BATCH, None, timeout=300)
    import webdataset
    probe = {"webdataset": webdataset.__version__, **({"error": probe["error"]} if "error" in probe else {})}
    log(f"open_clip_train with webdataset {probe['webdataset']}: {probe.get('error', 'works')}")

    warm_page_cache(tars)
    settings = [(size, workers) for size in args.sizes for workers in args.workers]
    rows, step, steps = [], 0, len(settings) * len(TOOLS)
    for k, (size, workers) in enumerate(settings):
        # open_clip's workers each stop after a whole number of batches; vlp drops its last partial batch the same way
        samples = workers * (total // workers // BATCH) * BATCH
        order = TOOLS[k % len(TOOLS):] + TOOLS[:k % len(TOOLS)]
        for tool in order:
            step += 1
            r = run_child(tool, spec, size, workers, samples, wds_path if tool == "open_clip" else None)
            r["load_1min_after"] = round(os.getloadavg()[0], 2)
            rows.append(r)
            if "error" in r:
                log(f"[{step}/{steps}] {size} px, {workers} worker(s), {TOOL_NAMES[tool]}: FAILED {r['error']}")
            else:
                log(f"[{step}/{steps}] {size} px, {workers} worker(s), {TOOL_NAMES[tool]}: {r['samples']:,} samples "
                    f"in {r['seconds']:.1f}s = {r['samples_per_s']:,.0f}/s, {r['cpu_ms_per_sample']:.2f} CPU ms/sample "
                    f"(webdataset {r['webdataset']}, load {r['load_1min_after']:.1f})")
    load_after = "/".join(f"{x:.2f}" for x in os.getloadavg())

    log(f"pixel differences over {args.pixel_images} images")
    images = distinct_images(shard_dir, args.pixel_images)
    pixels = {str(size): pixel_differences(images, size) for size in args.sizes}
    log("CPU cost per step")
    stages = {str(size): stage_costs(tars[0], size) for size in args.sizes}
    grids = sorted({160, *(round(160 * scale) for p in pixels.values() for scale in p["draft_scale"])})
    import PIL
    import torch

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True).stdout.strip()

    report = {
        "vlp_commit": git("rev-parse", "--short", "HEAD"),
        "vlp_loader_commit": git("log", "-1", "--format=%h", "--", *LOADER_FILES),
        "vlp_data_uncommitted": git("status", "--porcelain", "--", "vlp/data").splitlines(),
        "command": " ".join([".venv/bin/python", "benchmarks/loader_throughput.py"] + sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "pillow": PIL.__version__},
        "load_before": load_before, "load_after": load_after,
        "shards": args.shards, "samples": total, "batch": BATCH, "shuffle_buffer": SHUFFLE_BUFFER,
        "throughput": rows, "pixel_images": len(images), "pixels": pixels,
        "stages": stages, "stage_samples": SAMPLES_PER_SHARD, "crop_geometry": crop_geometry(grids),
        "webdataset_1x_probe": probe,
    }
    text = markdown(report)
    (args.out / "loader_throughput.json").write_text(json.dumps(report, indent=1))
    (args.out / "loader_throughput.md").write_text(text)
    print(text)
    if args.profile:
        for size in args.sizes:
            profile_vlp(spec, size, args.out)


if __name__ == "__main__":
    main()
