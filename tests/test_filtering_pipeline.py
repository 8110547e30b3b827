"""A config's ``filtering:`` section: score -> filter -> reshard before training, each stage skipped when done."""
from __future__ import annotations

import pytest

from conftest import make_shard_set
from vlp.config import ConfigError, experiment_from_dict
from vlp.data.shards import expand
from vlp.filtering.pipeline import run_filtering
from vlp.filtering.uids import read_uids, to_hex


def experiment(pool, work, keep=("score_top=0.5",), **data):
    return experiment_from_dict({"name": "dfn", "model": {"name": "vlp-tiny-32"}, "data": data,
                                 "filtering": {"pool": str(pool), "model": "vlp-tiny-32", "keep": list(keep),
                                               "work": str(work), "samples_per_shard": 4, "workers": 0}})


def test_stages_run_once_and_the_run_trains_on_the_kept_samples(tmp_path):
    uids = make_shard_set(tmp_path / "pool", [6, 6])
    exp = experiment(tmp_path / "pool", tmp_path / "work")
    done = run_filtering(exp, tmp_path / "run")
    kept = tmp_path / "work" / "kept"
    assert [s.shards for s in done.data.train] == [str(kept)]
    selected = to_hex(read_uids(tmp_path / "work" / "selection" / "uids.npy"))
    assert 6 <= len(selected) <= 7 and set(selected) <= set(uids)  # the top half, ties at the cut kept
    assert sum(s.samples for s in expand(str(kept))) == len(selected)
    outputs = sorted(p for p in (tmp_path / "work").rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in outputs]
    again = run_filtering(done, tmp_path / "run")  # a resumed run: its saved config names the kept shards
    assert again.data.train == done.data.train
    assert [p.stat().st_mtime_ns for p in outputs] == stamps  # nothing scored, selected or written again


def test_a_selection_made_with_other_rules_is_not_reused(tmp_path):
    make_shard_set(tmp_path / "pool", [5])
    run_filtering(experiment(tmp_path / "pool", tmp_path / "work"), tmp_path / "run")
    with pytest.raises(ValueError, match="made with the rules"):
        run_filtering(experiment(tmp_path / "pool", tmp_path / "work", keep=("score_top=0.3",)), tmp_path / "run")


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"filtering.keep\[0\]: rule 'score_top=2'"):
        experiment(tmp_path / "pool", tmp_path / "work", keep=("score_top=2",))
    with pytest.raises(ConfigError, match="filtering.model or filtering.model_config"):
        experiment_from_dict({"name": "x", "filtering": {"pool": "p", "keep": ["score>=0"]}})
    exp = experiment(tmp_path / "pool", tmp_path / "work", train=[{"shards": "elsewhere"}])
    with pytest.raises(ValueError, match="leave data.train out"):
        run_filtering(exp, tmp_path / "run")


def test_a_filter_network_stopped_by_sigterm_ends_the_pipeline_and_resumes(tmp_path, monkeypatch):
    """SIGTERM during the filter network's training: checkpointed, and nothing is scored with the unfinished
    network (a restart would take those scores as complete); the same call then finishes it and scores."""
    import os
    import signal

    import yaml

    from vlp.filtering.pipeline import Interrupted
    from vlp.train.loop import Trainer

    make_shard_set(tmp_path / "pool", [6, 6])
    config = tmp_path / "net.yaml"
    config.write_text(yaml.safe_dump({"name": "net", "model": {"name": "vlp-tiny-32"},
                                      "data": {"train": [{"shards": str(tmp_path / "pool" / "{00000..00001}.tar")}],
                                               "batch_size": 4, "workers": 0},
                                      "train": {"max_steps": 6, "epochs": 10, "log_every": 1}}))
    exp = experiment_from_dict({"name": "dfn", "model": {"name": "vlp-tiny-32"},
                                "filtering": {"pool": str(tmp_path / "pool"), "model_config": str(config),
                                              "keep": ["score_top=0.5"], "work": str(tmp_path / "work"),
                                              "samples_per_shard": 4, "workers": 0}})
    step = Trainer.train_step

    def interrupted(self, micro):
        step(self, micro)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(Interrupted, match="stopped before its last step"):
        run_filtering(exp, tmp_path / "run")
    network = tmp_path / "work" / "filter-network"
    assert (network / "checkpoints" / "latest").exists()
    assert not list((tmp_path / "work").glob("scores/*.parquet")), "nothing scored with the unfinished network"
    monkeypatch.setattr(Trainer, "train_step", step)
    run_filtering(exp, tmp_path / "run")
    assert sorted(p.name for p in (network / "checkpoints").iterdir() if p.name.startswith("step-"))[-1] == \
        "step-0000006"
    assert len(list((tmp_path / "work").glob("scores/*.parquet"))) == 2
