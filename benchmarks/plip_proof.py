"""Do PLIP's identity-level objectives pay on person retrieval? (configs/plip-pedestrians.yaml)

One model (vlp-tiny-32), one data set (the 992 pedestrian train crops of ../shared/data with pseudo-captions), one
step budget, trained with:

  (a0) instance-level CLIP, shuffled batches          (a) instance-level CLIP, 16 identities x 4 images per batch
  (b)  identity contrast (group_contrast on identity)  (c) identity contrast + attribute prediction + colorization
  and (c) without each of its three objectives (identity contrast replaced by CLIP)

each evaluated on the pedestrian val people (eval/suites/pedestrians.yaml): image->image Rank-k / mAP / mINP under
both gallery rules, and text->image with the query crops' pseudo-captions.

    .venv/bin/python benchmarks/plip_proof.py [--seeds 0 1] [--ablation-seeds 0] [--steps 300]
    .venv/bin/python benchmarks/plip_proof.py --timing                          # step time of each objective set

Prints Markdown tables; writes benchmarks/out/plip/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, median, stdev

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out" / "plip"
CONFIG = "configs/plip-pedestrians.yaml"
SHARDS = REPO / "work" / "shards-attr"
DATA = REPO.parent / "shared" / "data"

CLIP = "{name: clip}"
IDC = "{name: group_contrast, options: {field: identity}}"
ATTR = "{name: attributes, weight: 0.5, options: {head: attributes, classes: [11, 11]}}"
COLOR = "{name: colorize, weight: 1.0, options: {head: colorizer}}"
HEAD = "attributes: {type: attribute_head, classes: [11, 11]}"
DECODER = "colorizer: {type: colorizer, resolution: 8, width: 64}"


def variant(objectives: list[str], parts: list[str], pk: bool = True) -> list[str]:
    sets = ["objectives=[" + ", ".join(objectives) + "]", "model.parts={" + ", ".join(parts) + "}"]
    if not pk:
        sets.append("data.identity_batches=null")
    return sets


VARIANTS = {
    "(a) CLIP": variant([CLIP], []),
    "(b) identity contrast": variant([IDC], []),
    "(c) all three": variant([IDC, ATTR, COLOR], [HEAD, DECODER]),
    "(c) without identity contrast (CLIP)": variant([CLIP, ATTR, COLOR], [HEAD, DECODER]),
    "(c) without attribute prediction": variant([IDC, COLOR], [DECODER]),
    "(c) without colorization": variant([IDC, ATTR], [HEAD]),
    "(a0) CLIP, shuffled batches": variant([CLIP], [], pk=False),
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def prepare() -> None:
    if not (SHARDS / "pedestrians" / "train" / "manifest.json").exists():
        subprocess.run(["bash", "datasets/pedestrians.sh", str(SHARDS), str(DATA)], cwd=REPO, check=True,
                       env={**os.environ, "PYTHON": sys.executable, "VLP_SHARDS_FLAGS": "--captions attributes"})


def train(name: str, seed: int, steps: int) -> dict:
    run = OUT / "runs" / f"{slug(name)}-s{seed}"
    evaluated = run / "eval" / f"step-{steps:07d}"
    if not evaluated.exists():
        cmd = [sys.executable, "-m", "vlp", "train", CONFIG, "--run-dir", str(run), "--set", f"train.seed={seed}",
               "--set", f"train.max_steps={steps}", "--set", "train.checkpoint_every=null"]
        for s in VARIANTS[name]:
            cmd += ["--set", s]
        print("$", " ".join(cmd), flush=True)
        with open(OUT / f"{slug(name)}-s{seed}.log", "w") as log:
            subprocess.run(cmd, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    results = {}
    for path in sorted(evaluated.glob("*.json")):
        record = json.loads(path.read_text())
        rule = (record.get("options") or {}).get("gallery_rule", path.stem)
        results[rule] = record["metrics"]
    return results


def timing(rounds: int, steps: int) -> dict[str, float]:
    """Seconds per training step of each objective set, measured in this process on one fixed P x K batch,
    the variants interleaved round by round (so that a drifting host affects all alike); median over rounds."""
    import tempfile

    import torch

    from vlp.config import load_experiment
    from vlp.train.loop import Trainer

    trainers, batches = {}, {}
    for name in VARIANTS:
        if "shuffled" in name:
            continue
        exp = load_experiment(REPO / CONFIG, [f"{s}" for s in VARIANTS[name]] + ["eval.suite=null"])
        trainers[name] = Trainer(exp, tempfile.mkdtemp(prefix="plip-timing-"))
        batches[name] = next(iter(trainers[name].loader))
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            trainer.train_step([batches[name]])  # warm
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step([batches[name]])
            times[name].append((time.perf_counter() - start) / steps)
    print(f"torch threads {torch.get_num_threads()}")
    return {name: median(t) for name, t in times.items()}


def cpu_name() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of (a), (b) and (c)")
    p.add_argument("--ablation-seeds", type=int, nargs="*", default=[0], help="seeds of (a0) and the ablations")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--timing", action="store_true", help="only the step time of each objective set")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    prepare()
    if args.timing:
        seconds = timing(args.rounds, steps=5)
        base = seconds["(a) CLIP"]
        print(f"\nCPU: {cpu_name()} ({len(os.sched_getaffinity(0))} cores); median of {args.rounds} rounds of 5 "
              "steps, batch 64 (16 x 4)\n")
        print("| objectives | s / step | x (a) |\n|---|---|---|")
        for name, s in seconds.items():
            print(f"| {name} | {s:.3f} | {s / base:.2f} |")
        (OUT / "timing.json").write_text(json.dumps({"cpu": cpu_name(), "seconds": seconds}, indent=1))
        return 0
    main_set = ["(a) CLIP", "(b) identity contrast", "(c) all three"]
    table: dict[str, dict[int, dict]] = {name: {} for name in VARIANTS}
    for seed in args.seeds:  # the comparison first, seed by seed; then the extra rows
        for name in main_set:
            table[name][seed] = train(name, seed, args.steps)
    for seed in args.ablation_seeds:
        for name in VARIANTS:
            if name not in main_set:
                table[name][seed] = train(name, seed, args.steps)
    (OUT / "results.json").write_text(json.dumps(table, indent=1))
    columns = [("same_camera", "image_to_image_rank@1"), ("same_camera", "image_to_image_mAP"),
               ("same_image", "image_to_image_rank@1"), ("same_image", "image_to_image_mAP"),
               ("same_image", "text_to_image_rank@1"), ("same_image", "text_to_image_rank@5"),
               ("same_image", "text_to_image_mAP")]
    print(f"\n{args.steps} steps of 64 (16 identities x 4); mean (sd) over the seeds, in %\n")
    print("| training | seeds | i2i R@1 (same camera) | i2i mAP (same camera) | i2i R@1 (same image) "
          "| i2i mAP (same image) | t2i R@1 | t2i R@5 | t2i mAP |")
    print("|---|---|" + "---|" * len(columns))
    for name, seeds in table.items():
        if not seeds:
            continue
        cells = [",".join(map(str, seeds))]
        for rule, metric in columns:
            values = [100 * seeds[s][rule][metric] for s in seeds]
            cells.append(f"{mean(values):.1f}" + (f" ({stdev(values):.1f})" if len(values) > 1 else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
