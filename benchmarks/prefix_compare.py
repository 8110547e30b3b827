"""Prefix conditioning (Saito et al., CVPR 2023) against its baselines on CPU.

Flickr8k train captions + CIFAR-10 train labels (as the cifar10 registry's prompts), configs/prefix-mixed.yaml with
four variants, each trained with two seeds (the two seeds of one variant run at once, one thread each):
  a  captions only              data.train=[flickr8k], model.parts={}
  b  mixed, no prefix           model.parts={}
  c  mixed, prefix              the config as is (zero-shot with the caption prefix)
  d  mixed, prefix, UniCL       objectives=[{name: group_contrast}]
Each run is evaluated on eval/suites/flickr8k-cifar10.yaml, on CIFAR-10 test turned greyscale (an image-level
shift) and, for c and d, on CIFAR-10 with the label prefix (--text-kind label).

    .venv/bin/python benchmarks/prefix_compare.py --steps 800            # all phases; finished runs are reused
    .venv/bin/python benchmarks/prefix_compare.py --steps 800 --phase summary
    .venv/bin/python benchmarks/prefix_compare.py --steps 800 --seeds 0 1 2 --variants b c   # a third seed of b, c

Everything is written under benchmarks/out/prefix_compare (git-ignored).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
OUT = REPO / "benchmarks" / "out" / "prefix_compare"
VLP = [sys.executable, "-m", "vlp"]
CONFIG = "configs/prefix-mixed.yaml"
MAIN_SUITE = "eval/suites/flickr8k-cifar10.yaml"
SEEDS = [0, 1]
VARIANTS = {
    "a": ("captions only", ["--set", "model.parts={}"]),
    "b": ("mixed, no prefix", ["--set", "model.parts={}"]),
    "c": ("mixed, prefix", []),
    "d": ("mixed, prefix, label-aware targets", ["--set", "objectives=[{name: group_contrast}]"]),
}
GREY_SUITE = """\
name: cifar10-grey
description: CIFAR-10 test zero-shot on greyscale copies of the images (an image-level shift)
data_root: .
datasets:
  cifar10-grey:
    format: folder
    path: cifar10-grey
    split: test
    classnames: cifar10
    templates: ["a photo of a {c}."]
tasks:
  - dataset: cifar10-grey
    task: zeroshot_classification
"""
# The label prefix, evaluated on CIFAR-10 alone (the retrieval half of the main suite is caption text).
LABEL_SUITE = """\
name: cifar10-label
description: CIFAR-10 test zero-shot (for --text-kind label)
data_root: %s
datasets:
  cifar10:
    format: folder
    path: cifar10
    split: test
    classnames: cifar10
    templates: ["a photo of a {c}."]
tasks:
  - dataset: cifar10
    task: zeroshot_classification
"""


def sh(cmd: list[str], log: Path | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    if log is None:
        subprocess.run(cmd, cwd=REPO, check=True)
    else:
        with log.open("w") as f:
            subprocess.run(cmd, cwd=REPO, check=True, stdout=f, stderr=subprocess.STDOUT)


# -- data -----------------------------------------------------------------------------------------------------------
def prepare() -> dict[str, str]:
    flickr = OUT / "shards" / "flickr8k-per-image-64" / "train"
    cifar = OUT / "shards" / "cifar10" / "train"
    if not (flickr / "manifest.json").exists():
        sh([*VLP, "shards", "captions", "--per-image", "--resize", "64", "--source", "flickr8k",
            "--images", str(DATA / "flickr8k/images"), "--captions", str(DATA / "flickr8k/captions.txt"),
            "--split", str(DATA / "flickr8k/splits/train.txt"), "--out", str(flickr), "--samples-per-shard", "1000"])
    if not (cifar / "manifest.json").exists():
        sh([*VLP, "shards", "folder", "--source", "cifar10", "--root", str(DATA / "cifar10/train"),
            "--out", str(cifar), "--samples-per-shard", "2000"])
    grey = OUT / "cifar10-grey" / "test"
    if not grey.exists():
        src = DATA / "cifar10" / "test"
        for p in sorted(src.rglob("*.jpg")):
            q = grey / p.relative_to(src)
            q.parent.mkdir(parents=True, exist_ok=True)
            Image.open(p).convert("L").convert("RGB").save(q, quality=95)
    (OUT / "cifar10-grey.yaml").write_text(GREY_SUITE)
    (OUT / "cifar10-label.yaml").write_text(LABEL_SUITE % DATA)
    return {"flickr": spec(flickr), "cifar": spec(cifar)}


def spec(shards: Path) -> str:
    n = len(json.loads((shards / "manifest.json").read_text())["shards"])
    return f"{shards.relative_to(REPO)}/{{{0:05d}..{n - 1:05d}}}.tar"


# -- training -------------------------------------------------------------------------------------------------------
def train_cmd(variant: str, seed: int, steps: int, precision: str, shards: dict[str, str]) -> list[str]:
    flickr = f"{{shards: '{shards['flickr']}', weight: 1.0}}"
    cifar = f"{{shards: '{shards['cifar']}', weight: 1.0, prompts: cifar10}}"
    sources = f"[{flickr}]" if variant == "a" else f"[{flickr}, {cifar}]"
    return [*VLP, "train", CONFIG, "--run-dir", str(run_dir(variant, seed).relative_to(REPO)),
            "--set", f"data.train={sources}", *VARIANTS[variant][1],
            "--set", f"train.max_steps={steps}", "--set", f"train.seed={seed}", "--set", "train.threads=1",
            "--set", f"train.precision={precision}", "--set", "train.checkpoint_every=null"]


def run_dir(variant: str, seed: int) -> Path:
    return OUT / "runs" / f"{variant}-seed{seed}"


def train(steps: int, precision: str, shards: dict[str, str]) -> None:
    """The two seeds of one variant at once, one thread each; the wall time of each process is recorded."""
    for variant in VARIANTS:
        procs = []
        for seed in SEEDS:
            run = run_dir(variant, seed)
            cmd = train_cmd(variant, seed, steps, precision, shards)
            if (run / "wall.json").exists():
                if json.loads((run / "wall.json").read_text())["cmd"] != cmd:
                    raise SystemExit(f"{run} holds a run with other settings: delete it")
                continue
            run.mkdir(parents=True, exist_ok=True)
            print("+", " ".join(cmd), flush=True)
            log = (run.parent / f"{run.name}.log").open("w")
            procs.append((run, cmd, time.monotonic(), subprocess.Popen(cmd, cwd=REPO, stdout=log,
                                                                        stderr=subprocess.STDOUT)))
        for run, cmd, start, proc in procs:
            if proc.wait() != 0:
                raise SystemExit(f"training failed ({proc.returncode}): {' '.join(cmd)}; see {run}.log")
            wall = time.monotonic() - start
            (run / "wall.json").write_text(json.dumps({"cmd": cmd, "seconds": round(wall, 1)}, indent=1))
            print(f"{run.name}: {wall:.0f} s", flush=True)


# -- evaluation -----------------------------------------------------------------------------------------------------
def eval_jobs() -> list[list[str]]:
    jobs = []
    for variant in VARIANTS:
        for seed in SEEDS:
            run = run_dir(variant, seed)
            suites = [(MAIN_SUITE, "main", []), (str(OUT / "cifar10-grey.yaml"), "grey", [])]
            if variant in ("c", "d"):
                suites.append((str(OUT / "cifar10-label.yaml"), "label", ["--text-kind", "label"]))
            for suite, name, extra in suites:
                out = run / "eval" / name
                if (out / "summary.csv").exists():
                    continue
                jobs.append([*VLP, "eval", "--model", str(run), "--suite", suite, "--no-cache", "--workers", "0",
                             "--threads", "1", "--out", str(out), *extra])
    return jobs


def evaluate() -> None:
    """Two evaluations at a time, one thread each (the machine's two cores)."""
    jobs, running = eval_jobs(), []
    while jobs or running:
        while jobs and len(running) < 2:
            cmd = jobs.pop(0)
            print("+", " ".join(cmd), flush=True)
            log = Path(cmd[cmd.index("--out") + 1] + ".log")
            log.parent.mkdir(parents=True, exist_ok=True)
            running.append((cmd, subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)))
        time.sleep(1)
        for item in list(running):
            cmd, proc = item
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode != 0:
                    raise SystemExit(f"evaluation failed ({proc.returncode}): {' '.join(cmd)}")


# -- summary --------------------------------------------------------------------------------------------------------
COLUMNS = [  # (key, header)
    ("cifar", "CIFAR-10 acc1"), ("grey", "grey CIFAR-10 acc1"), ("cifar_label", "CIFAR-10 acc1, label prefix"),
    ("t2i10", "Flickr R@10 t2i"), ("i2t10", "Flickr R@10 i2t"), ("t2i1", "R@1 t2i"), ("i2t1", "R@1 i2t"),
    ("wall", "wall s"),
]


def metrics(variant: str, seed: int) -> dict[str, float]:
    run = run_dir(variant, seed)

    def read(name, file):
        return json.loads((run / "eval" / name / file).read_text())["metrics"]

    ret = read("main", "flickr8k__zeroshot_retrieval.json")
    row = {"cifar": read("main", "cifar10__zeroshot_classification.json")["acc1"],
           "grey": read("grey", "cifar10-grey__zeroshot_classification.json")["acc1"],
           # image_retrieval: a caption queries the images (t2i); text_retrieval: an image queries the captions
           "t2i10": ret["image_retrieval_recall@10"], "i2t10": ret["text_retrieval_recall@10"],
           "t2i1": ret["image_retrieval_recall@1"], "i2t1": ret["text_retrieval_recall@1"],
           "wall": json.loads((run / "wall.json").read_text())["seconds"]}
    if variant in ("c", "d"):
        row["cifar_label"] = read("label", "cifar10__zeroshot_classification.json")["acc1"]
    return row


def fmt(key: str, v: float) -> str:
    return f"{v:.0f}" if key == "wall" else f"{100 * v:.1f}"


def summary() -> None:
    rows = {(v, s): metrics(v, s) for v in VARIANTS for s in SEEDS}
    lines = ["| variant | " + " | ".join(h for _, h in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for v, (label, _) in VARIANTS.items():
        cells = []
        for key, _ in COLUMNS:
            vals = [rows[v, s][key] for s in SEEDS if key in rows[v, s]]
            if not vals:
                cells.append("-")
                continue
            mean = statistics.fmean(vals)
            cells.append(f"**{fmt(key, mean)}** ({' / '.join(fmt(key, x) for x in vals)})")
        lines.append(f"| ({v}) {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Differences of seed means, c - b (each seed's own difference in brackets; seed s of c against "
                 "seed s of b):")
    for key, header in COLUMNS[:-1]:
        if key == "cifar_label":
            continue
        per = [rows["c", s][key] - rows["b", s][key] for s in SEEDS]
        spread = [max(rows[v, s][key] for s in SEEDS) - min(rows[v, s][key] for s in SEEDS) for v in ("b", "c")]
        each = " / ".join(f"{100 * x:+.1f}" for x in per)
        lines.append(f"- {header}: {100 * statistics.fmean(per):+.1f} points ({each}); "
                     f"seed-to-seed spread (max - min) b {100 * spread[0]:.1f}, c {100 * spread[1]:.1f}")
    text = "\n".join(lines)
    tag = "-".join(VARIANTS) + "-seeds" + "".join(map(str, SEEDS))
    (OUT / f"summary-{tag}.md").write_text(text + "\n")
    (OUT / f"summary-{tag}.json").write_text(json.dumps({f"{v}-seed{s}": r for (v, s), r in rows.items()}, indent=1))
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800, help="step budget of every run (the config has 1450)")
    ap.add_argument("--precision", default=None, help="bf16 or fp32 (default: bf16 where lscpu shows avx512_bf16)")
    ap.add_argument("--seeds", type=int, nargs="+", default=SEEDS, help="seeds of every variant")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="the difference c - b needs both")
    ap.add_argument("--phase", choices=["all", "train", "eval", "summary"], default="all")
    args = ap.parse_args()
    SEEDS[:] = args.seeds
    for v in [v for v in VARIANTS if v not in args.variants]:
        del VARIANTS[v]
    precision = args.precision or ("bf16" if "avx512_bf16" in Path("/proc/cpuinfo").read_text() else "fp32")
    shards = prepare()
    if args.phase in ("all", "train"):
        train(args.steps, precision, shards)
    if args.phase in ("all", "eval"):
        evaluate()
    if args.phase in ("all", "summary"):
        summary()


if __name__ == "__main__":
    main()
