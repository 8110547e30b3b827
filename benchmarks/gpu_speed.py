"""Training speed on one GPU: vlp's trainer against ``open_clip_train.main``, ViT-B/32, bf16, batch 256.

    python benchmarks/gpu_speed.py --out OUT                          # on a GPU machine, about 6 minutes
    python benchmarks/gpu_speed.py --out OUT --device cpu --model vlp-tiny-32 --batch 32 --images 512 \\
        --steps 6 --warmup 2 --e2e-steps 12 --e2e-skip 4 --workers 2 --no-compile   # a dry run of every part

Each part runs in its own subprocess (a failure or a hang costs that part only; ``--deadline`` skips the parts
that would start too late) and writes ``OUT/<part>.json``; ``OUT/gpu_speed.{json,md}`` gather them.
- ``env``: GPU, driver, torch; the bf16 matrix-product ceiling (8192^3, median of 10 after 3 warm-ups).
- ``flops``: FLOPs of one training step (forward + backward, bf16 autocast) per sample, counted by
  ``torch.utils.flop_counter`` on the open_clip model over the padded context (the model's nominal FLOPs: the
  ones MFU is quoted against for both tools), and again with vlp's packed text tower (the FLOPs vlp executes).
- ``shards``: synthetic WebDataset shards written on the spot (256 px JPEGs of smooth random colour fields plus
  noise, captions of 7-20 words drawn from a word list, a json with the uid), so both tools read the same bytes.
- ``resident-*``: each tool's real step code with the batches already on the GPU (no loader): vlp's
  ``Trainer.train`` with its loader swapped for resident batches, open_clip_train's ``main`` with ``get_data``
  swapped likewise. vlp's tokens stay in pinned host memory, where its loaders deliver them (its trainer plans
  the packed text tower from the host's tokens; from device tokens that would be one more read per step). The
  clock starts after ``--warmup`` steps (device synchronised) and stops after the last step's optimizer update.
  ``-nopack`` runs vlp over the padded context (the same FLOPs as open_clip). ``-compile`` is
  ``model.compile: true`` / ``--torchcompile`` (vlp then runs its text tower over the padded context, as open_clip
  does); ``-compile-visual`` compiles vlp's image tower only and keeps the packed text tower.
- ``e2e-*``: each tool's command line from the shards (``--workers`` loader processes, resampled shards, full
  batches only), its log polled every 0.05 s: samples/s between the first logged step at or after ``--e2e-skip``
  and the last step.
MFU = samples/s x nominal FLOPs per sample / the GPU's dense bf16 peak (datasheet; also given against the
measured matrix-product ceiling).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense, datasheets
WORDS = ("a man woman child dog cat girl boy group people two three black white red blue young old small large "
         "wearing holding running standing sitting playing walking jumping riding looking next to in on at with "
         "of the street grass water beach snow field park building crowd ball shirt jacket hat bike car road "
         "front behind near while over under smiling brown green yellow rock tree sand wave mountain").split()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(7, 20))) + "."


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# -- parts -----------------------------------------------------------------------------------------------------
def part_env(args) -> dict:
    import torch

    info = {"torch": torch.__version__, "cpus": os.cpu_count(), "device": args.device}
    if args.device != "cuda":
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                cuda=torch.version.cuda)
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = repr(e)
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1000)
    times.sort()
    info["matmul_bf16_tflops"] = round(2 * 8192**3 / times[len(times) // 2] / 1e12, 1)
    info["peak_bf16_tflops"] = next((v / 1e12 for k, v in PEAK_BF16.items() if k in props.name), None)
    return info


def batches(args, count: int, normalized: bool, host_tokens: bool = False):
    """``count`` distinct resident batches (images, tokens) on the device: images uint8 (vlp's loaders hand over
    uint8 on an accelerator) or normalised float (open_clip's loader hands over float). ``host_tokens``: the tokens
    stay in pinned host memory, where vlp's loaders deliver them: its trainer works out the packed text tower's
    plan from them before the copy (on device tokens that would be a read from the device every step)."""
    import open_clip
    import torch

    import vlp.models  # noqa: F401 - registers vlp's model configs

    size = open_clip.get_model_config(args.model)["vision_cfg"]["image_size"]
    tokenizer = open_clip.get_tokenizer(args.model)
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, generator=gen)
        if normalized:
            from vlp.data.preprocess import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, normalize_batch

            images = normalize_batch(images, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
        tokens = tokenizer([caption(rng) for _ in range(args.batch)])
        tokens = tokens.pin_memory() if host_tokens and args.device != "cpu" else tokens.to(args.device)
        out.append((images.to(args.device), tokens))
    return out


def part_flops(args) -> dict:
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vlp.config import ModelConfig
    from vlp.models import build_model

    loss_fn = open_clip.ClipLoss()
    images, texts = batches(args, 1, normalized=True)[0]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    def count(pack: bool) -> float | None:
        torch.manual_seed(0)
        model = build_model(ModelConfig(name=args.model), args.device, pack_text=pack)
        if pack and not model.packed:
            return None
        counter = FlopCounterMode(display=False)
        with counter, torch.autocast(args.device, dtype=dtype, enabled=args.device == "cuda"):
            out = model(model.prepare({"image": images, "text": texts.cpu()}) | {"image": images})
            loss_fn(out["image_features"], out["text_features"], out["logit_scale"]).backward()
        return counter.get_total_flops() / args.batch

    packed = count(True)
    tokens = (texts.argmax(-1) + 1).float().mean().item()
    return {"nominal_flops_per_sample": count(False), "packed_flops_per_sample": packed,
            "pack_text": "packed" if packed is not None else "not packable",
            "mean_caption_tokens": round(tokens, 1), "context": texts.shape[1]}


class Resident:
    """Resident batches as a loader: the clock starts (device synchronised) when batch ``warmup`` is asked for, and
    stops (synchronised again) if the loop asks for one more batch after the last (open_clip_train's does)."""

    def __init__(self, args, items, total: int, as_dict: bool):
        self.args, self.items, self.total, self.as_dict = args, items, total, as_dict
        self.num_batches, self.num_samples = total, total * args.batch
        self.t0 = self.t1 = None
        from collections import Counter

        self.skipped = Counter()

    def __len__(self):
        return self.total

    def __iter__(self):
        for i in range(self.total):
            if i == self.args.warmup:
                sync(self.args.device)
                self.t0 = time.perf_counter()
            images, texts = self.items[i % len(self.items)]
            yield {"image": images, "text": texts, "uid": [""] * len(texts)} if self.as_dict else (images, texts)
        sync(self.args.device)
        self.t1 = time.perf_counter()

    def set_epoch(self, epoch):
        pass

    def close(self):
        pass


def vlp_sets(args, shards: str | None = None) -> list[str]:
    sets = [f"model.name={args.model}", f"data.batch_size={args.batch}", "train.epochs=1", "train.log_every=50",
            "train.checkpoint_every=null", "train.resume=never", "schedule.warmup_steps=10",
            f"train.precision={'bf16' if args.device == 'cuda' else 'fp32'}", f"train.device={args.device}"]
    if shards:
        sets.append(f"data.train=[{{shards: '{shards}'}}]")
    return sets


def part_resident_vlp(args, pack: bool = True, compile: bool | str = False) -> dict:
    from vlp.config import load_experiment
    from vlp.train.loop import Trainer

    sets = vlp_sets(args, shard_spec(args)) + [f"model.pack_text={pack}", f"model.compile={compile}",
                                                      "data.workers=0"]
    trainer = Trainer(load_experiment(REPO / "configs" / "flickr8k-tiny.yaml", sets), Path(args.out) / "run-vlp")
    total = args.warmup + args.steps
    loader = Resident(args, batches(args, 4, normalized=False, host_tokens=True), total, as_dict=True)
    trainer.loader, trainer.total_steps = loader, total
    marks = []

    def save():  # called once, after the last step's update: stop the clock instead of writing a checkpoint
        sync(args.device)
        marks.append(time.perf_counter())

    trainer.save = save
    record = trainer.train()
    return {"samples_per_s": args.batch * args.steps / (marks[0] - loader.t0), "steps": args.steps,
            "final_loss": record["loss"]}


def part_resident_openclip(args, compile: bool = False) -> dict:
    import open_clip_train.main as ocm
    from open_clip_train.data import DataInfo

    import vlp.models  # noqa: F401 - vlp's model configs, for a dry run with vlp-tiny-32

    total = args.warmup + args.steps
    loader = Resident(args, batches(args, 4, normalized=True), total, as_dict=False)
    ocm.get_data = lambda *a, **k: {"train": DataInfo(loader)}
    run = Path(args.out) / "run-openclip"
    run.mkdir(parents=True, exist_ok=True)
    os.chdir(run)  # --logs none still makes a folder in the working directory
    precision = "amp_bf16" if args.device == "cuda" else "fp32"
    name = f"resident-{'compile' if compile else 'eager'}"  # open_clip_train refuses a run folder that exists
    ocm.main(["--dataset-type", "synthetic", "--train-num-samples", str(total * args.batch), "--batch-size",
              str(args.batch), "--precision", precision, "--model", args.model, "--workers", "0", "--epochs", "1",
              "--warmup", "10", "--lr", "1e-3", "--wd", "0.1", "--log-every-n-steps", "50", "--logs", "none",
              "--name", name, "--report-to", "", "--zeroshot-frequency", "0", "--val-frequency", "0",
              "--save-frequency", "0", *(["--torchcompile"] if compile else [])])
    return {"samples_per_s": args.batch * args.steps / (loader.t1 - loader.t0), "steps": args.steps}


def _write_shard(job) -> dict:
    import numpy as np
    from PIL import Image

    path, first, count, size = job
    rng, nrng = random.Random(first), np.random.default_rng(first)
    with tarfile.open(path, "w") as tar:
        for n in range(first, first + count):
            field = Image.fromarray(nrng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size),
                                                                                            Image.BICUBIC)
            pixels = np.asarray(field).astype(np.int16) + nrng.integers(-12, 13, (size, size, 3))
            buf = io.BytesIO()
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
            key = f"{n:09d}"
            for ext, data in (("jpg", buf.getvalue()), ("txt", caption(rng).encode()),
                              ("json", json.dumps({"uid": f"{n:032x}"}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return {"name": Path(path).name, "samples": count, "bytes": Path(path).stat().st_size}


def part_shards(args) -> dict:
    from multiprocessing import Pool

    root = Path(args.out) / "shards"
    root.mkdir(parents=True, exist_ok=True)
    per = args.images // args.shards
    jobs = [(str(root / f"{i:05d}.tar"), i * per, per, 256) for i in range(args.shards)]
    start = time.time()
    with Pool(min(os.cpu_count() or 1, 16)) as pool:
        records = pool.map(_write_shard, jobs)
    (root / "manifest.json").write_text(json.dumps({"shards": records, "samples": per * args.shards}))
    return {"samples": per * args.shards, "shards": args.shards, "mb": round(sum(r["bytes"] for r in records) / 1e6),
            "seconds": round(time.time() - start, 1)}


def shard_spec(args) -> str:
    return f"{Path(args.out).resolve()}/shards/{{00000..{args.shards - 1:05d}}}.tar"


def poll(cmd: list[str], env: dict, log_file: Path, steps_of, args, out: Path) -> dict:
    """Runs a training, polls its log for the step count, and kills it once the last step is logged."""
    log(" ".join(cmd))
    marks, last = [], -1
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env})
        while proc.poll() is None:
            done = steps_of(log_file) if log_file.exists() else 0
            if done != last:
                marks.append((time.perf_counter(), done))
                last = done
                if done >= args.e2e_steps:
                    proc.kill()
                    break
            time.sleep(0.05)
        proc.wait()
    first = next(((t, n) for t, n in marks if n >= args.e2e_skip), None)
    end = marks[-1] if marks else None
    if first is None or end[1] < args.e2e_steps or end[1] == first[1]:
        raise RuntimeError(f"no timed steps (rc {proc.returncode}, marks {marks[-3:]}): {' '.join(cmd)}; see {out}")
    return {"samples_per_s": args.batch * (end[1] - first[1]) / (end[0] - first[0]),
            "timed_steps": end[1] - first[1], "first_timed_step": first[1]}


def part_e2e_vlp(args) -> dict:
    run = Path(args.out) / "e2e-vlp"
    sets = vlp_sets(args, shard_spec(args)) + [
        # each loader worker batches its own share, full batches only: an epoch of whole batches per worker, at
        # least e2e_steps of them (250 steps over 12 workers would end the epoch at 240)
        f"data.workers={args.workers}", "data.resampled=true",
        f"data.samples_per_epoch={-(-args.e2e_steps // max(args.workers, 1)) * max(args.workers, 1) * args.batch}",
        f"train.max_steps={args.e2e_steps}", "data.shuffle_buffer=1000", "train.log_every=10",
        "data.drop_last=true"]  # full batches only, as open_clip_train's: samples = steps x batch
    cmd = [sys.executable, "-m", "vlp", "train", "configs/flickr8k-tiny.yaml", "--run-dir", str(run)]
    for s in sets:
        cmd += ["--set", s]

    def steps_of(path: Path) -> int:
        lines = [json.loads(x) for x in path.read_text().splitlines() if '"loss"' in x]
        return lines[-1]["step"] if lines else 0

    return poll(cmd, {}, run / "log.jsonl", steps_of, args, Path(args.out) / "e2e-vlp.log")


def part_e2e_openclip(args) -> dict:
    import re

    out = Path(args.out) / "e2e-openclip.log"
    wds = REPO / "benchmarks" / "out" / "wds0286"  # open_clip_train 3.3.0's pipeline needs webdataset 0.2.x
    cmd = [sys.executable, "benchmarks/openclip_train_entry.py", "--dataset-type", "webdataset", "--train-data",
           shard_spec(args), "--dataset-resampled", "--train-num-samples", str(args.e2e_steps * args.batch),
           "--batch-size", str(args.batch), "--precision", "amp_bf16" if args.device == "cuda" else "fp32",
           "--workers", str(args.workers), "--model", args.model, "--lr", "1e-3", "--wd", "0.1", "--warmup", "10",
           "--epochs", "1", "--log-every-n-steps", "10", "--save-frequency", "0", "--logs",
           str(Path(args.out).resolve() / "e2e-openclip"), "--name", "run", "--report-to", "", "--seed", "0",
           "--zeroshot-frequency", "0", "--val-frequency", "0"]
    pattern = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/")

    def steps_of(path: Path) -> int:
        found = pattern.findall(path.read_text())
        return int(found[-1]) // args.batch if found else 0

    path = os.pathsep.join(x for x in (str(wds), str(REPO), os.environ.get("PYTHONPATH")) if x)
    return poll(cmd, {"PYTHONPATH": path}, out, steps_of, args, out)


PARTS = {
    "env": part_env,
    "flops": part_flops,
    "shards": part_shards,
    "resident-vlp": part_resident_vlp,
    "resident-openclip": part_resident_openclip,
    "resident-vlp-nopack": lambda a: part_resident_vlp(a, pack=False),
    "e2e-vlp": part_e2e_vlp,
    "e2e-openclip": part_e2e_openclip,
    "resident-vlp-compile": lambda a: part_resident_vlp(a, compile=True),
    "resident-openclip-compile": lambda a: part_resident_openclip(a, compile=True),
    "resident-vlp-compile-visual": lambda a: part_resident_vlp(a, compile="visual"),
}


# -- report ----------------------------------------------------------------------------------------------------
def report(args, results: dict) -> str:
    env, flops = results.get("env", {}), results.get("flops", {})
    nominal, packed = flops.get("nominal_flops_per_sample"), flops.get("packed_flops_per_sample")
    peak = (env.get("peak_bf16_tflops") or 0) * 1e12
    ceiling = (env.get("matmul_bf16_tflops") or 0) * 1e12
    lines = [f"device: {env.get('gpu', args.device)} ({env.get('nvidia_smi', '')}); torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}, {env.get('cpus')} CPUs; bf16 matmul ceiling {env.get('matmul_bf16_tflops')} "
             f"TFLOP/s, datasheet peak {env.get('peak_bf16_tflops')} TFLOP/s",
             f"model {args.model}, batch {args.batch}; FLOPs per sample (forward + backward): nominal "
             f"{(nominal or 0) / 1e9:.1f} G, vlp packed text {(packed or 0) / 1e9:.1f} G "
             f"(mean caption {flops.get('mean_caption_tokens')} of {flops.get('context')} tokens)", "",
             "| part | samples/s | MFU (peak) | MFU (measured ceiling) | note |", "|---|---|---|---|---|"]
    for name in PARTS:
        r = results.get(name)
        if name in ("env", "flops", "shards") or r is None:
            continue
        if "error" in r:
            lines.append(f"| {name} | - | - | - | {r['error'][:150]} |")
            continue
        rate = r["samples_per_s"]
        mfu = f"{100 * rate * nominal / peak:.1f}%" if nominal and peak else "-"
        mfc = f"{100 * rate * nominal / ceiling:.1f}%" if nominal and ceiling else "-"
        note = f"{r.get('timed_steps', r.get('steps'))} timed steps"
        if name.startswith("resident-vlp") and "nopack" not in name and "compile" not in name and packed and peak:
            note += f"; executed-FLOP utilisation {100 * rate * packed / peak:.1f}%"
        lines.append(f"| {name} | {rate:.0f} | {mfu} | {mfc} | {note} |")
    pairs = [("resident-vlp", "resident-openclip"), ("resident-vlp-nopack", "resident-openclip"),
             ("e2e-vlp", "e2e-openclip"), ("resident-vlp-compile", "resident-openclip-compile"),
             ("resident-vlp-compile-visual", "resident-openclip-compile")]
    lines.append("")
    for a, b in pairs:
        if "samples_per_s" in results.get(a, {}) and "samples_per_s" in results.get(b, {}):
            lines.append(f"{a} / {b}: {results[a]['samples_per_s'] / results[b]['samples_per_s']:.2f}x")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup", type=int, default=20, help="resident steps before the clock starts")
    p.add_argument("--steps", type=int, default=100, help="resident steps timed")
    p.add_argument("--e2e-steps", type=int, default=300)
    p.add_argument("--e2e-skip", type=int, default=60, help="end-to-end steps before the clock starts")
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--images", type=int, default=16384)
    p.add_argument("--shards", type=int, default=32)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--parts", help="comma-separated parts to run (default: all)")
    p.add_argument("--deadline", type=float, default=480, help="seconds: no part starts after this")
    p.add_argument("--part-timeout", type=float, default=150)
    p.add_argument("--part", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part:  # one part, in this subprocess
        sys.path.insert(0, str(REPO))
        result = PARTS[args.part](args)
        (out / f"{args.part}.json").write_text(json.dumps(result, indent=1))
        return
    start, results = time.time(), {}
    for name in PARTS:
        if (args.no_compile and name.endswith("-compile")) or (args.parts and name not in args.parts.split(",")):
            continue
        left = args.deadline - (time.time() - start)
        if left < 20:
            results[name] = {"error": "skipped: deadline"}
            continue
        log(f"part {name}")
        t = time.time()
        try:
            path = os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH")) if x)
            proc = subprocess.run([sys.executable, __file__, "--part", name, *sys.argv[1:]], cwd=REPO,
                                  timeout=min(args.part_timeout, left), capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": path})
            (out / f"{name}.stderr").write_text(proc.stdout[-20000:] + proc.stderr[-20000:])
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
                results[name] = {"error": f"rc {proc.returncode}: {tail[0]}"}
            else:
                results[name] = json.loads((out / f"{name}.json").read_text())
        except subprocess.TimeoutExpired:
            results[name] = {"error": f"timed out after {min(args.part_timeout, left):.0f} s"}
        results[name]["part_seconds"] = round(time.time() - t, 1)
        log(f"  {json.dumps(results[name])[:300]}")
        (out / "gpu_speed.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    text = report(args, results)
    (out / "gpu_speed.md").write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
