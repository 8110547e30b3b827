"""One experiment from pool to evaluation: ``vlp train`` on a config with a ``filtering:`` section runs
filter network -> score -> filter -> reshard, then trains on the kept samples (and evaluates them with ``eval.suite``).

Every stage is skipped where its output is already whole (a finished run folder, a scores manifest, a selection
report made with the same rules, a shard manifest), so a killed pipeline resumes where it stopped. A selection made
with other rules is an error rather than silently reused: the shards and the run trained on them would no longer
say what they hold.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from vlp.config import Experiment, SourceConfig, load_experiment

log = logging.getLogger(__name__)


def folders(exp: Experiment, run_dir: Path) -> dict[str, Path]:
    work = Path(exp.filtering.work) if exp.filtering.work else run_dir / "filtering"
    return {"work": work, "network": work / "filter-network", "scores": work / "scores",
            "selection": work / "selection", "kept": work / "kept"}


def run_filtering(exp: Experiment, run_dir: Path, rank: int = 0, world_size: int = 1) -> Experiment:
    """Run the stages that are not done yet; returns the experiment with ``data.train`` set to the kept shards."""
    f = exp.filtering
    where = folders(exp, run_dir)
    kept = [SourceConfig(shards=str(where["kept"]))]
    if exp.data.train and exp.data.train != kept:  # a run's saved config.yaml holds the kept shards: that is fine
        raise ValueError("data.train: a run with filtering.pool trains on the kept samples of the pool "
                         f"({where['kept']}); leave data.train out")
    model_spec = f.model
    if f.model_config is not None:
        model_spec = str(where["network"])
        _train_network(f.model_config, where["network"])
    _score(exp, model_spec, where["scores"], rank, world_size)
    if rank == 0:
        _select(f.keep, where["scores"], where["selection"])
        _reshard(f.pool, where["selection"] / "uids.npy", where["kept"], f.samples_per_shard, max(1, f.workers))
    if world_size > 1:
        from vlp.filtering.cli import _barrier

        _barrier()
    data = dataclasses.replace(exp.data, train=kept)
    return dataclasses.replace(exp, data=data)


class Interrupted(Exception):
    """A stage stopped before its end (SIGTERM): the later stages must not use its output."""


def _train_network(config: str, run_dir: Path) -> None:
    """Train (or resume) the filter network; a finished run resumes at its last step and does no work. Stopped by
    SIGTERM, it is checkpointed and the pipeline ends there: scoring the pool with a network short of its steps
    would make scores that a restart then takes as complete."""
    from vlp.train.loop import train

    print(f"filtering: filter network {config} in {run_dir}", flush=True)
    record = train(load_experiment(config), run_dir)
    if record.get("stopped"):
        raise Interrupted(f"the filter network in {run_dir} stopped before its last step (SIGTERM); the same command "
                          "resumes it, then scores the pool")


def _score(exp: Experiment, model_spec: str, out: Path, rank: int, world_size: int) -> None:
    import torch

    from vlp.eval.models import load_model
    from vlp.filtering import score
    from vlp.filtering.table import MANIFEST

    f = exp.filtering
    if (out / MANIFEST).exists():
        log.info("filtering: %s is finished", out)
        return
    opts = score.ScoreOptions(batch_size=f.batch_size, workers=f.workers, fast_decode=not f.exact_decode,
                              embeddings=f.dedup_suite is not None)
    local_rank = score.distributed_env()[2]
    device = "cpu" if exp.train.device == "cpu" or not torch.cuda.is_available() else f"cuda:{local_rank}"
    print(f"filtering: scoring {f.pool} with {model_spec} into {out}", flush=True)
    model = load_model(model_spec, device=device)
    score.score_pool(model, f.pool, out, opts, rank, world_size)
    eval_sets = score.embed_eval_sets(model, f.dedup_suite, out, opts) if f.dedup_suite and rank == 0 else None
    if world_size > 1:
        from vlp.filtering.cli import _barrier

        _barrier()
    if rank == 0:
        print(score.format_summary(score.finish(f.pool, out, model.describe, opts, eval_sets), out), flush=True)


def _select(rules: list[str], scores: Path, out: Path) -> None:
    from vlp.filtering.select import filter_scores, format_report

    report_path = out / "report.json"
    if report_path.exists():
        made_with = json.loads(report_path.read_text()).get("rules")
        if made_with != list(rules):
            raise ValueError(f"{out} holds a selection made with the rules {made_with}, not {list(rules)}: remove "
                             "it (and the kept shards and run trained on it) or choose another filtering.work")
        log.info("filtering: %s is finished", out)
        return
    print(format_report(filter_scores(scores, list(rules), out)), flush=True)


def _reshard(pool: str, uids: Path, out: Path, samples_per_shard: int, workers: int) -> None:
    from vlp.data.shards import MANIFEST
    from vlp.filtering.reshard import format_report, reshard

    if (out / MANIFEST).exists():
        log.info("filtering: %s is finished", out)
        return
    print(format_report(reshard(pool, uids, out, samples_per_shard=samples_per_shard, workers=workers), out),
          flush=True)
