"""Learning at parity: vlp's trainer against ``open_clip_train.main`` on Flickr8k train, CPU.

    .venv/bin/python benchmarks/train_compare.py                       # the parity run: 3 epochs, warmup 30
    .venv/bin/python benchmarks/train_compare.py --epochs 1 --warmup 12
    .venv/bin/python benchmarks/train_compare.py --fast                # also vlp's recipe, configs/flickr8k-fast.yaml
    .venv/bin/python benchmarks/train_compare.py --fast --no-parity    # open_clip_train and the recipe only

open_clip_train imports pandas, which vlp does not need; install it first:
``.venv/bin/python -m pip install -c constraints.txt -e '.[bench]'``.

What it does, one step after the other (never two trainings at once, so wall times are comparable):
1. writes the Flickr8k train shards (30,000 samples, one per caption) into ``--out/shards`` if missing, and with
   ``--fast`` the per-image shards of ``configs/flickr8k-fast.yaml`` (6,000 images shrunk to 64 px); installs
   webdataset 0.2.86 into ``benchmarks/out/wds0286`` if missing (open_clip_train 3.3.0's pipeline fails on
   webdataset 1.x);
2. trains ``vlp-tiny-32`` with open_clip_train (through ``benchmarks/openclip_train_entry.py``), then with
   ``vlp train configs/flickr8k-tiny.yaml``: batch 256, lr 1e-3, wd 0.1, AdamW betas (0.9, 0.98), eps 1e-6, linear
   warmup then cosine, fp32, 2 loader workers, the same number of steps (``train.max_steps`` = open_clip's step
   count); samples seen differ by a few hundred per epoch (vlp's last two batches of an epoch are partial, open_clip
   tops its workers up with repeated samples);
3. evaluates both final models with the same ``vlp eval`` suite (``eval/suites/flickr8k-cifar10.yaml``: Flickr8k 1k
   test retrieval, CIFAR-10 test zero-shot with "a photo of a {c}.");
4. writes both loss curves into ``loss_curves.png`` and the figures into ``summary.{json,md}``.
A training whose folder holds ``wall.json`` is not run again (delete the folder to redo it).
Wall time is the training process from start to exit (start-up, data, checkpoints included; no evaluation).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
PY = sys.executable
WDS = REPO / "benchmarks" / "out" / "wds0286"
SUITE = REPO / "eval" / "suites" / "flickr8k-cifar10.yaml"
MODEL = "vlp-tiny-32"
BATCH, WORKERS, SHARD_SIZE = 256, 2, 1000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(cmd: list[str], out: Path | None = None, env: dict | None = None) -> float:
    """Runs ``cmd`` (stdout+stderr to ``out``), raises on failure, returns its wall seconds."""
    log(" ".join(cmd))
    start = time.time()
    with open(out, "w") if out else open(os.devnull, "w") as f:
        rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}" + (f"; see {out}" if out else ""))
    return time.time() - start


# -- preparation ---------------------------------------------------------------------------------------------------
def ensure_shards(out: Path, per_image: bool = False, resize: int | None = None) -> Path:
    shards = out / ("flickr8k-per-image" if per_image else "flickr8k") / "train"
    if resize:
        shards = shards.parent.with_name(f"{shards.parent.name}-{resize}") / "train"
    if not (shards / "manifest.json").exists():
        flags = (["--per-image"] if per_image else []) + (["--resize", str(resize)] if resize else [])
        sh([PY, "-m", "vlp", "shards", "captions", "--source", "flickr8k", "--images", str(DATA / "flickr8k/images"),
            "--captions", str(DATA / "flickr8k/captions.txt"), "--split", str(DATA / "flickr8k/splits/train.txt"),
            "--out", str(shards), "--samples-per-shard", str(SHARD_SIZE), *flags])
    return shards


def ensure_wds() -> None:
    if not (WDS / "webdataset").exists():
        sh([PY, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(WDS), "webdataset==0.2.86"])


def shard_spec(shards: Path) -> str:
    n = len(json.loads((shards / "manifest.json").read_text())["shards"])
    return f"{shards}/{{00000..{n - 1:05d}}}.tar"


def openclip_steps_per_epoch(shards: Path) -> int:
    """Steps of one open_clip_train epoch: ceil(samples / batch) rounded up to a multiple of the workers. Each
    worker yields that share of full batches; webdataset 0.2.x's ``with_epoch`` starts a worker's shards over
    when they run out, so a few samples are seen twice (30,208 per epoch for 30,000)."""
    samples = sum(s["samples"] for s in json.loads((shards / "manifest.json").read_text())["shards"])
    return math.ceil(math.ceil(samples / BATCH) / WORKERS) * WORKERS


# -- the two trainings ---------------------------------------------------------------------------------------------
def reuse(run: Path, settings: dict) -> dict | None:
    """The record of a finished training in ``run``, if any; one made with other settings is an error."""
    if not (run / "wall.json").exists():
        return None
    record = json.loads((run / "wall.json").read_text())
    if record.get("settings") != settings:
        raise SystemExit(f"{run} holds a training with settings {record.get('settings')}, not {settings}: "
                         "delete it or pass another --out")
    return record


def run_openclip(out: Path, shards: Path, epochs: int, warmup: int, log_every: int, seed: int) -> dict:
    run = out / "openclip"
    settings = {"epochs": epochs, "warmup": warmup, "seed": seed}
    if record := reuse(run, settings):
        return record
    ensure_wds()
    num_samples = sum(s["samples"] for s in json.loads((shards / "manifest.json").read_text())["shards"])
    cmd = [PY, "benchmarks/openclip_train_entry.py", "--dataset-type", "webdataset",
           "--train-data", shard_spec(shards), "--train-num-samples", str(num_samples),
           "--batch-size", str(BATCH), "--lr", "1e-3", "--wd", "0.1", "--beta1", "0.9", "--beta2", "0.98",
           "--eps", "1e-6", "--epochs", str(epochs), "--warmup", str(warmup), "--workers", str(WORKERS),
           "--model", MODEL, "--precision", "fp32", "--save-frequency", "1", "--logs", str(run), "--name", "parity",
           "--report-to", "", "--log-every-n-steps", str(log_every), "--seed", str(seed), "--zeroshot-frequency", "0",
           "--val-frequency", "0"]
    run.mkdir(parents=True, exist_ok=True)
    (run / "cmd.txt").write_text(" ".join(cmd) + "\n")
    seconds = sh(cmd, run / "stdout.log", env={"PYTHONPATH": str(WDS)})
    record = {"seconds": round(seconds, 1), "weights": str(run / "parity" / "checkpoints" / f"epoch_{epochs}.pt"),
              "settings": settings}
    (run / "wall.json").write_text(json.dumps(record))
    return record


def run_vlp(out: Path, name: str, config: str, sets: list[str], env: dict | None = None) -> dict:
    run = out / name
    if record := reuse(run, {"config": config, "set": sets}):
        return record
    from vlp.config import load_experiment

    model = load_experiment(config, sets).model.name
    cmd = [PY, "-m", "vlp", "train", config, "--run-dir", str(run)] + [a for s in sets for a in ("--set", s)]
    run.mkdir(parents=True, exist_ok=True)
    (run / "cmd.txt").write_text(" ".join(cmd) + "\n")
    seconds = sh(cmd, run / "stdout.log", env)
    last = (run / "checkpoints" / "latest").read_text().strip()  # the name of the last checkpoint folder
    record = {"seconds": round(seconds, 1), "weights": str(run / "checkpoints" / last / "model.safetensors"),
              "model": model, "settings": {"config": config, "set": sets}}
    (run / "wall.json").write_text(json.dumps(record))
    return record


def evaluate(out: Path, name: str, weights: str, model: str = MODEL) -> dict:
    dest = out / "eval" / name
    if not (dest / "flickr8k__zeroshot_retrieval.json").exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        sh([PY, "-m", "vlp", "eval", "--model", f"{model}:{weights}", "--suite", str(SUITE), "--out", str(dest),
            "--no-cache"], dest.parent / f"{name}.log")
    retrieval = json.loads((dest / "flickr8k__zeroshot_retrieval.json").read_text())["metrics"]
    cifar = json.loads((dest / "cifar10__zeroshot_classification.json").read_text())["metrics"]
    metrics = {f"t2i_R@{k}": retrieval[f"image_retrieval_recall@{k}"] for k in (1, 5, 10)}
    metrics.update({f"i2t_R@{k}": retrieval[f"text_retrieval_recall@{k}"] for k in (1, 5, 10)})
    metrics["cifar10_acc1"] = cifar["acc1"]
    return metrics


# -- curves --------------------------------------------------------------------------------------------------------
OPENCLIP_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+).*?Batch \(t\): [\d.]+, ([\d.]+)/s.*?Loss: ([\d.]+)")


def openclip_curve(run: Path, steps_per_epoch: int) -> list[dict]:
    """(step, samples seen, loss of that step, samples/s of that step) from open_clip_train's out.log. Its
    '[seen/total]' counts batches of this epoch; total is rounded up to whole batches per worker, so epochs are
    offset by the steps actually made."""
    rows = []
    for line in (run / "parity" / "out.log").read_text().splitlines():
        m = OPENCLIP_LINE.search(line)
        if m:
            step = int(m[1]) * steps_per_epoch + int(m[2]) // BATCH
            rows.append({"step": step, "samples": step * BATCH, "loss": float(m[5]), "samples_per_s": float(m[4])})
    return rows


def vlp_curve(run: Path) -> list[dict]:
    """(step, samples seen, loss, samples/s) from vlp's log.jsonl. Each loader worker ends an epoch with one partial
    batch, so an epoch of S samples is S, not steps x batch."""
    import yaml

    data = yaml.safe_load((run / "config.yaml").read_text())["data"]
    batch, workers, drop_last = data["batch_size"], max(1, data["workers"]), data.get("drop_last", False)
    sizes = [s["samples"] for s in json.loads((Path(data["train"][0]["shards"]).parent / "manifest.json")
                                              .read_text())["shards"]]
    per_worker = [sum(sizes[w::workers]) for w in range(workers)]
    if drop_last:  # full batches only
        epoch_steps = sum(n // batch for n in per_worker)
        epoch_samples = epoch_steps * batch
    else:
        epoch_steps, epoch_samples = sum(math.ceil(n / batch) for n in per_worker), sum(per_worker)

    def seen(step: int) -> int:
        return step // epoch_steps * epoch_samples + min(step % epoch_steps * batch, epoch_samples)

    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    return [{"step": r["step"], "samples": seen(r["step"]), "loss": r["loss"], "samples_per_s": r["samples_per_s"]}
            for r in rows if "loss" in r]


def plot(curves: dict[str, list[dict]], path: Path, title: str, labels: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rows in curves.items():
        ax.plot([r["samples"] for r in rows], [r["loss"] for r in rows], label=labels[label])
    ax.set_xlabel("training samples seen")
    ax.set_ylabel("contrastive loss of the step (chance: ln batch)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(summary: dict) -> str:
    cols = ["t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10", "cifar10_acc1"]
    lines = ["| run | steps | samples seen | wall (s) | " + " | ".join(cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    for name, r in summary["runs"].items():
        vals = " | ".join(f"{100 * r['metrics'][c]:.1f}" for c in cols)
        lines.append(f"| {name} | {r['steps']} | {r['samples_seen']:,} | {r['wall_s']:.0f} | {vals} |")
    return "\n".join(lines) + "\n\nRecall and accuracy in %. t2i: text -> image; i2t: image -> text.\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "train_compare"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=30, help="warmup steps, the same for both tools")
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="seed of both trainings")
    p.add_argument("--shards", help="folder of the shard sets (default: --out/shards, written if missing)")
    p.add_argument("--fast", action="store_true", help="also train and evaluate configs/flickr8k-fast.yaml")
    p.add_argument("--fast-steps", type=int, help="train.max_steps of the fast recipe (fit to open_clip's wall time)")
    p.add_argument("--fast-seed", type=int, help="train.seed of the fast recipe (default: --seed)")
    p.add_argument("--no-parity", action="store_true",
                   help="skip vlp's parity run (open_clip_train against the fast recipe only, e.g. on a host whose "
                        "speed has changed since the parity run)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    shard_root = Path(args.shards) if args.shards else out / "shards"
    shards = ensure_shards(shard_root)
    steps = args.epochs * openclip_steps_per_epoch(shards)
    runs = {"open_clip_train": run_openclip(out, shards, args.epochs, args.warmup, args.log_every, args.seed)}
    curves = {"open_clip_train": openclip_curve(out / "openclip", steps // args.epochs)}
    if not args.no_parity:
        runs["vlp"] = run_vlp(out, "vlp", "configs/flickr8k-tiny.yaml", [
            f"data.train=[{{shards: '{shard_spec(shards)}'}}]", f"train.epochs={args.epochs}",
            f"train.max_steps={steps}", f"schedule.warmup_steps={args.warmup}", f"train.log_every={args.log_every}",
            "train.checkpoint_every=null", f"train.seed={args.seed}"])
        curves["vlp"] = vlp_curve(out / "vlp")
    if args.fast:
        fast_shards = ensure_shards(shard_root, per_image=True, resize=64)
        sets = [f"data.train=[{{shards: '{shard_spec(fast_shards)}'}}]",
                f"train.seed={args.seed if args.fast_seed is None else args.fast_seed}"]
        if args.fast_steps:
            sets.append(f"train.max_steps={args.fast_steps}")
        # an empty inductor cache: where the recipe compiles a tower, its wall time includes compiling from scratch
        cold = {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-")}
        runs["vlp fast recipe"] = run_vlp(out, "vlp-fast", "configs/flickr8k-fast.yaml", sets, cold)
        curves["vlp fast recipe"] = vlp_curve(out / "vlp-fast")

    summary = {"epochs": args.epochs, "warmup_steps": args.warmup, "seed": args.seed, "batch": BATCH, "model": MODEL,
               "runs": {}}
    for name, run in runs.items():
        rows = curves[name]
        summary["runs"][name] = {"wall_s": run["seconds"], "steps": rows[-1]["step"],
                                 "samples_seen": rows[-1]["samples"],
                                 "final_loss": rows[-1]["loss"], "weights": run["weights"],
                                 "metrics": evaluate(out, name.replace(" ", "-"), run["weights"],
                                                     run.get("model", MODEL))}
    labels = {name: f"{name} ({MODEL}, batch {BATCH})" for name in curves}
    if args.fast:
        import yaml

        fast = yaml.safe_load((out / "vlp-fast" / "config.yaml").read_text())
        labels["vlp fast recipe"] = f"vlp fast recipe ({fast['model']['name']}, batch {fast['data']['batch_size']})"
    plot(curves, out / "loss_curves.png", f"Flickr8k train; parity: lr 1e-3, {args.epochs} epoch(s), "
                                           f"warmup {args.warmup}", labels)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    log(f"wrote {out / 'summary.json'}, {out / 'summary.md'}, {out / 'loss_curves.png'}")


if __name__ == "__main__":
    main()
