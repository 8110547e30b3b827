"""``vlp demo``: the pipeline end to end on data that scikit-learn ships (8x8 handwritten digits).

Digits become PNG files plus a CSV of captions (several phrasings per digit), the CSV becomes shards through
the same writer users run on their data (:mod:`vlp.data.builtin`), and the shards are streamed back through
the training loader. The experiment is ``configs/digits-tiny.yaml``, shipped with the package.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from vlp import resources
from vlp.data.builtin import builtin_data


def run_demo(out: str | Path = "runs/demo", quick: bool = False) -> int:
    """Shards from digits, a tiny CLIP trained on them (configs/digits-tiny.yaml), zero-shot on held-out digits."""
    from vlp.config import load_experiment
    from vlp.train.loop import Trainer

    config = resources.path("configs", "digits-tiny.yaml")
    out = Path(out)
    if (out / "config.yaml").exists():
        shutil.rmtree(out)  # a previous demo run: start afresh rather than resume it
    start = time.time()
    root = builtin_data("digits")
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    print(f"[1/3] data: {manifest['samples']:,} captioned digits in {len(manifest['shards'])} shards at "
          f"{root / 'shards'}; held-out test images in {root / 'raw' / 'test'}", flush=True)
    exp = load_experiment(config, ["eval.suite=digits", "train.resume=never"] if quick else [], smoke=quick)
    print(f"[2/3] training {exp.model.name} for {exp.train.epochs} epochs ({config.name}"
          f"{', smoke' if quick else ''}) into {out}", flush=True)
    trainer = Trainer(exp, out)
    trainer.train()
    print("[3/3] zero-shot evaluation on held-out digits (chance: 10%)", flush=True)
    summaries = sorted((out / "eval").glob("step-*/summary.md"))
    if summaries:
        print(summaries[-1].read_text())
    print(f"done in {time.time() - start:.0f}s: loss curve {out / 'plots' / 'loss.png'}, "
          f"results in {summaries[-1].parent if summaries else out}", flush=True)
    return 0
