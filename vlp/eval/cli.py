"""``vlp eval``: run a suite on a model and write its results.

    vlp eval --model vlp-tiny-32:/path/model.safetensors --suite shared --out runs/eval/tiny
    vlp eval --model runs/my-run --suite smoke          # a run folder; results go to runs/my-run/eval/smoke

The suite is validated in full (paths, class names, templates, task options) before the model is loaded.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path



def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="zero-shot evaluation suites (classification, retrieval, person "
                                           "retrieval, linear probe)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="NAME:TAG, NAME:/path/weights, a vlp run folder, or a checkpoint file with --model-name")
    p.add_argument("--model-name", help="open_clip config of a checkpoint file or run folder")
    p.add_argument("--suite", required=True, help="a suite file, or a name in eval/suites/ (e.g. shared, smoke)")
    p.add_argument("--out", type=Path, help="result folder (default: <run>/eval/<suite> for a run folder, "
                                            "else runs/eval/<suite>/<model>)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=1, help="decoding processes (0: decode in the main process)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads on CPU (default: cores left over by the decoding "
                                               "workers, at least 1)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")
    p.add_argument("--cache-dir", type=Path, help="embedding cache (default $VLP_CACHE_DIR/eval, else "
                                                  "~/.cache/vlp/eval)")
    p.add_argument("--data-root", type=Path, help="override the suite's data_root")
    p.add_argument("--exact-decode", action="store_true",
                   help="decode every JPEG pixel (open_clip's preprocessing) instead of DCT-scaled fast decoding")
    p.add_argument("--plot", action="store_true", help="also write summary.png")
    p.add_argument("--text-kind", default=None,
                   help="for a model with a text prefix: the prefix texts are encoded with (default: the suite's "
                        "text_kind, else the model's first kind, the caption prefix)")
    p.set_defaults(func=run)
    return p


def _default_out(args, suite_name: str) -> Path:
    spec = Path(args.model)
    if spec.is_dir():
        return spec / "eval" / (suite_name if args.text_kind is None else f"{suite_name}-{args.text_kind}")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", args.model if not spec.is_file() else f"{args.model_name}_{spec.stem}")
    slug = slug.strip("_") + (f"-{args.text_kind}" if args.text_kind else "")
    return Path("runs") / "eval" / suite_name / slug


def cpu_threads(workers: int) -> int:
    """Torch threads that leave one core per decoding worker. Oversubscribed cores cost far more than they
    give: torch's threads spin at every barrier while a worker holds their core (on 2 cores with 1 worker,
    2 threads embed 3x slower than 1 under load)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - workers)


def run(args: argparse.Namespace) -> int:
    # Imported here: ``vlp --help`` builds this parser and should not pay for torch and open_clip.
    import torch

    from vlp.eval.features import FeatureOptions, FeatureStore, default_cache_dir
    from vlp.eval.images import LoadOptions
    from vlp.eval.models import load_model
    from vlp.eval.report import unweighted_average, write_results
    from vlp.eval.suite import load_suite, run_suite

    suite = load_suite(args.suite, args.data_root)  # every input error surfaces here, before any model work
    if args.device == "cpu":
        torch.set_num_threads(args.threads or cpu_threads(args.workers))
    model = load_model(args.model, args.model_name, args.device, text_kind=args.text_kind or suite.text_kind)
    store = FeatureStore(model, FeatureOptions(
        load=LoadOptions(batch_size=args.batch_size, workers=args.workers, fast_decode=not args.exact_decode),
        cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir())))
    start = time.time()
    results = run_suite(suite, store)
    out = args.out or _default_out(args, suite.name)
    written = write_results(suite, results, model.describe, out, plot=args.plot)
    print((out / "summary.md").read_text())
    print(f"average {unweighted_average(results):.4f} over {len(results)} entries in {time.time() - start:.1f}s; "
          f"{len(written)} files in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vlp").setLevel(logging.INFO)  # ours; open_clip logs its model building on the root logger
    parser = argparse.ArgumentParser(prog="vlp")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
