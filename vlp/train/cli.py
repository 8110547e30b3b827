"""``vlp train CONFIG [--set key=value ...] [--smoke]`` (also under ``torchrun --nproc_per_node N -m vlp train``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from vlp.config import ConfigError, load_experiment


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model from one experiment config")
    p.add_argument("config", help="configs/<experiment>.yaml")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=5e-4 (repeatable)")
    p.add_argument("--smoke", action="store_true", help="apply the config's smoke section: a few steps, tiny data")
    p.add_argument("--run-dir", help="run folder (default: <out>/<name> from the config)")


def run(args) -> int:
    from vlp.train.loop import TrainingDiverged, train
    from vlp.train.distributed import teardown

    try:
        exp = load_experiment(args.config, args.overrides, args.smoke)
    except ConfigError as e:
        print(f"vlp train: config error: {e}", file=sys.stderr)
        return 2
    try:
        if exp.filtering.pool is not None:  # pool -> score -> filter -> reshard, then train on the kept samples
            from vlp.filtering.pipeline import Interrupted, run_filtering
            from vlp.filtering.score import distributed_env

            rank, world_size, _ = distributed_env()
            try:
                exp = run_filtering(exp, Path(args.run_dir or Path(exp.out) / exp.name), rank, world_size)
            except Interrupted as e:  # as a stopped training run: checkpointed, exit 0, resumed by the same command
                print(f"vlp train: {e}", flush=True)
                return 0
        record = train(exp, args.run_dir)
    except TrainingDiverged as e:
        print(f"vlp train: stopped: {e}", file=sys.stderr)
        return 3
    finally:
        teardown()
    print(json.dumps({"final": record}), flush=True)
    return 0
