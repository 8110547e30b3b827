"""Does filtering with a data filtering network pay on a noisy pool? (configs/dfn-flickr8k.yaml)

Pool: Flickr8k train, one sample per caption (30,000), a seeded half given another image's caption
(datasets/flickr8k_noisy.py; the ground truth stays in each sample's json as ``corrupted``). Filter network: a small
CLIP trained on Flickr8k dev only (configs/dfn-filter-flickr8k.yaml). Then one training recipe, equal steps and batch,
on four training sets:

  (a) the whole pool   (b) a random half   (c) the filter's top half (vlp's pipeline)   (d) the clean half (oracle)

and each model evaluated on Flickr8k 1k-test retrieval and CIFAR-10 zero-shot (eval/suites/flickr8k-cifar10.yaml).
Also reported: how well the filter's score separates clean from corrupted pairs (ROC AUC, histograms).

    .venv/bin/python benchmarks/dfn_proof.py [--seeds 0 1] [--work work/dfn-flickr8k] [--steps 1450]

Prints a Markdown table; writes benchmarks/out/dfn/ (scores histogram PNG, results JSON).
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/dfn-flickr8k.yaml"
POOL = "work/pools/flickr8k-noisy"
DEV = "work/shards/flickr8k-per-image-64/dev"
DATA = ROOT.parent / "shared" / "data"


def sh(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run(args, cwd=ROOT, check=True)


def vlp(*args: str) -> None:
    sh(sys.executable, "-m", "vlp", *args)


def prepare() -> None:
    if not (ROOT / POOL / "manifest.json").exists():
        sh(sys.executable, "datasets/flickr8k_noisy.py", POOL, "--data", str(DATA))
    if not (ROOT / DEV / "manifest.json").exists():
        flickr = DATA / "flickr8k"
        vlp("shards", "captions", "--per-image", "--resize", "64", "--source", "flickr8k", "--images",
            str(flickr / "images"), "--captions", str(flickr / "captions.txt"), "--split",
            str(flickr / "splits/dev.txt"), "--out", DEV)


def ground_truth(pool: str = POOL) -> dict[str, bool]:
    from vlp.data.shards import expand_urls, iter_raw_samples

    truth = {}
    for url in expand_urls(str(ROOT / pool)):
        for sample in iter_raw_samples(url):
            meta = json.loads(sample["json"])
            truth[meta["uid"]] = bool(meta["corrupted"])
    return truth


def separation(scores_dir: Path, truth: dict[str, bool], out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq
    from sklearn.metrics import roc_auc_score

    from vlp.filtering.table import tables

    uids, scores = [], []
    for path in tables(scores_dir):
        t = pq.read_table(path, columns=["uid", "score"])
        uids += t.column("uid").to_pylist()
        scores += t.column("score").to_pylist()
    labels = np.array([not truth[u] for u in uids])  # 1 = clean
    scores = np.array(scores, dtype=np.float64)
    auc = float(roc_auc_score(labels, scores))
    cut = float(np.quantile(scores, 0.5))
    kept = scores >= cut
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bins = np.linspace(scores.min(), scores.max(), 60)
    ax.hist(scores[labels], bins, alpha=0.6, label=f"clean ({labels.sum():,})")
    ax.hist(scores[~labels], bins, alpha=0.6, label=f"corrupted ({(~labels).sum():,})")
    ax.axvline(cut, color="k", lw=1, ls="--", label="top-50% cut")
    ax.set_xlabel("filter score (cosine)")
    ax.set_ylabel("pairs")
    ax.set_title(f"Flickr8k noisy pool, ROC AUC {auc:.3f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "scores.png", dpi=110)
    return {"auc": auc, "pairs": len(scores), "clean_in_top_half": float(labels[kept].mean()),
            "cut": cut}


def selections(work: Path, truth: dict[str, bool], seed: int) -> dict[str, Path]:
    """uid files of the baselines (b) and (d), resharded like the pipeline's own selection."""
    from vlp.filtering.uids import write_uids

    uids = sorted(truth)
    rng = random.Random(seed)
    chosen = {"random-half": rng.sample(uids, len(uids) // 2), "clean-half": [u for u in uids if not truth[u]]}
    kept = {}
    for name, subset in chosen.items():
        folder = work / "baselines" / name
        if not (folder / "kept" / "manifest.json").exists():
            write_uids(folder / "uids.npy", subset)
            vlp("reshard", "--pool", str(ROOT / POOL), "--uids", str(folder / "uids.npy"), "--out",
                str(folder / "kept"), "--samples-per-shard", "1000")
        kept[name] = folder / "kept"
    return kept


def train(name: str, seed: int, steps: int, runs: Path, shards: str | None) -> dict:
    run_dir = runs / f"{name}-s{seed}"
    args = ["train", CONFIG, "--run-dir", str(run_dir), "--set", f"train.seed={seed}",
            "--set", f"train.max_steps={steps}"]
    if shards is not None:  # a baseline: no filtering, train on the given shards
        args += ["--set", "filtering.pool=null", "--set", f"data.train=[{{shards: {shards}}}]"]
    start = time.time()
    evaluated = run_dir / "eval" / f"step-{steps:07d}"  # the suite's results at the last step (eval.suite)
    if not (evaluated / "summary.md").exists():
        vlp(*args)
    results = {}
    for path in sorted(evaluated.glob("*.json")):
        results[path.stem] = json.loads(path.read_text())["metrics"]
    return {"seconds": round(time.time() - start, 1), "results": results}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=1450)
    p.add_argument("--work", type=Path, default=ROOT / "work" / "dfn-flickr8k")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "dfn")
    p.add_argument("--separation-of", metavar="MODEL", help="only score --separation-pool with MODEL (any vlp score "
                   "--model) and print its ROC AUC, e.g. a model trained on Flickr8k train on a noisy test split "
                   "(datasets/flickr8k_noisy.py --split test)")
    p.add_argument("--separation-pool", default="work/pools/flickr8k-noisy-test")
    args = p.parse_args()
    if args.separation_of:
        scores = args.out / "separation" / Path(args.separation_of).name
        if not (scores / "manifest.json").exists():
            vlp("score", "--model", args.separation_of, "--pool", args.separation_pool, "--out", str(scores))
        sep = separation(scores, ground_truth(args.separation_pool), scores)
        print(f"{args.separation_of} on {args.separation_pool}: ROC AUC {sep['auc']:.4f} over {sep['pairs']:,} "
              f"pairs; clean share of the top half {sep['clean_in_top_half']:.3f}")
        return 0
    prepare()
    runs = args.out / "runs"
    # (c) first: its run trains the filter network and scores, selects and reshards the pool
    rows = {}
    for seed in args.seeds:
        rows[("(c) filter top half", seed)] = train("dfn-top-half", seed, args.steps, runs, None)
    truth = ground_truth()
    sep = separation(args.work / "scores", truth, args.out)
    baselines = selections(args.work, truth, seed=0)
    for seed in args.seeds:
        rows[("(a) whole pool", seed)] = train("whole-pool", seed, args.steps, runs, str(ROOT / POOL))
        rows[("(b) random half", seed)] = train("random-half", seed, args.steps, runs, str(baselines["random-half"]))
        rows[("(d) clean half", seed)] = train("clean-half", seed, args.steps, runs, str(baselines["clean-half"]))
    (args.out / "results.json").write_text(json.dumps({"separation": sep, "runs": {
        f"{k[0]} s{k[1]}": v for k, v in rows.items()}}, indent=1))
    print(f"\nfilter score: ROC AUC {sep['auc']:.4f} over {sep['pairs']:,} pairs; clean share of the top half "
          f"{sep['clean_in_top_half']:.3f}\n")
    print("| training set | seed | Flickr8k t2i R@1 / R@5 / R@10 | i2t R@1 / R@5 / R@10 | CIFAR-10 acc1 |")
    print("|---|---|---|---|---|")
    for (name, seed), row in sorted(rows.items()):
        r, c = row["results"].get("flickr8k__zeroshot_retrieval", {}), row["results"].get(
            "cifar10__zeroshot_classification", {})
        t2i = " / ".join(f"{100 * r.get(f'image_retrieval_recall@{k}', float('nan')):.2f}" for k in (1, 5, 10))
        i2t = " / ".join(f"{100 * r.get(f'text_retrieval_recall@{k}', float('nan')):.2f}" for k in (1, 5, 10))
        print(f"| {name} | {seed} | {t2i} | {i2t} | {100 * c.get('acc1', float('nan')):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
