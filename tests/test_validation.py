"""Nothing fails silently: config values checked when the config loads, an epoch with no batch, objective and
model contracts that the trainer checks when it is built."""
from __future__ import annotations

import pytest
import torch

from conftest import make_sample, write_tar
from vlp.config import ConfigError, experiment_from_dict, load_experiment
from vlp.objectives import OBJECTIVES, Objective, build_objective
from vlp.train.loop import EmptyEpoch, Trainer


def config(shards="builtin:digits", **sections) -> dict:
    data = {"name": "v", "data": {"train": [{"shards": str(shards)}], "batch_size": 8, "workers": 0},
            "model": {"name": "vlp-tiny-32"}, "train": {"max_steps": 2}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    return data


@pytest.mark.parametrize("section, values, message", [
    ("schedule", {"name": "step"}, "schedule.name: 'step' is not one of 'cosine', 'linear', 'constant'"),
    ("train", {"precision": "fp8"}, "train.precision: 'fp8'"),
    ("train", {"device": "tpu"}, "train.device: 'tpu'"),
    ("model", {"compile": "vision"}, "model.compile: 'vision'"),
    ("model", {"name": "ViT-Z-99"}, "model.name: unknown model config 'ViT-Z-99'"),
    ("data", {"caption": "all"}, "data.caption: 'all' is not 'first' or 'random'"),
    ("data", {"captions_per_sample": 3}, "data.captions_per_sample: 3 needs to be 1, or more with"),
    ("data", {"cutout": 40}, "data.cutout: 40"),
    ("data", {"size_schedule": [[0, 16], [2, 24]]}, "data.size_schedule: the last size is 24"),
    ("train", {"accum_steps": 0}, "train.accum_steps: 0"),
    ("train", {"ema": 1.5}, "train.ema: 1.5"),
    ("model", {"parts": {"h": {"type": "linear_head"}}}, "model.parts.h.classes: required option is missing"),
    ("model", {"parts": {"h": {"type": "mlp_head", "classes": 3}}}, "model.parts.h.type: unknown model part"),
])
def test_bad_values_are_errors_naming_file_and_key_when_the_config_loads(tmp_path, section, values, message):
    path = tmp_path / "exp.yaml"
    path.write_text(__import__("yaml").safe_dump(config(**{section: values})))
    with pytest.raises(ConfigError, match=message) as error:
        load_experiment(path)
    assert str(error.value).startswith(str(path))


@pytest.mark.parametrize("objectives, message", [
    ([{"name": "clip2"}], r"objectives\[0\].name: unknown objective 'clip2' \(known: attributes, classify, clip, "
                          "colorize, group_contrast, siglip"),
    ([{"name": "clip"}, {"name": "classify"}], r"objectives\[1\].options.head: required option is missing"),
    ([{"name": "siglip", "options": {"local_loss": True}}], r"objectives\[0\].options.local_loss: unknown option"),
    ([{"name": "clip", "options": {"label_smoothing": 1.0}}], "label_smoothing: 1.0"),
])
def test_objectives_are_checked_when_the_config_loads(objectives, message):
    with pytest.raises(ConfigError, match=message):
        experiment_from_dict(config(objectives=objectives))


def test_an_objective_that_needs_no_local_loss_need_not_take_it(monkeypatch):
    class Plain(Objective):
        reads = ("image_features",)

        def forward(self, out, batch):
            return out["image_features"].sum(), {}

    monkeypatch.setitem(OBJECTIVES._items, "test_plain", Plain)
    objective = build_objective("test_plain", {}, rank=1, world_size=2, local_loss=True)
    assert isinstance(objective, Plain)
    clip = build_objective("clip", {}, rank=1, world_size=2, local_loss=True)  # clip takes all three
    assert clip.loss.local_loss and clip.loss.rank == 1 and clip.loss.world_size == 2


def test_an_objective_with_parameters_is_refused(monkeypatch):
    class Owning(Objective):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4, 2)

    monkeypatch.setitem(OBJECTIVES._items, "test_owning", Owning)
    with pytest.raises(ValueError, match="objectives.test_owning: objective 'test_owning' has trainable parameters; "
                                         "put them in the model"):
        build_objective("test_owning", {})


def test_accumulation_refuses_an_output_it_cannot_merge_naming_the_objective(tmp_path, monkeypatch):
    class ReadsTokens(Objective):
        reads = ("image_features", "image_tokens")

    monkeypatch.setitem(OBJECTIVES._items, "test_tokens", ReadsTokens)
    exp = experiment_from_dict(config(objectives=[{"name": "clip"}, {"name": "test_tokens"}],
                                      train={"accum_steps": 2}))
    with pytest.raises(ValueError, match=r"objectives\[1\] \(test_tokens\) reads 'image_tokens', which the model "
                                         "does not say how to merge"):
        Trainer(exp, tmp_path)


def test_an_epoch_without_a_batch_stops_the_run_naming_shards_and_skips(tmp_path):
    """Identity shards have no text: every sample is skipped. The run must stop with the reason, not loop."""
    root = tmp_path / "ids"
    root.mkdir()
    samples = [make_sample(f"p{i}", i, identity=i // 4) for i in range(12)]
    for sample in samples:
        del sample["txt"]
    write_tar(root / "00000.tar", samples)
    for in_memory in (False, True):
        exp = experiment_from_dict(config(root / "00000.tar", data={"in_memory": in_memory},
                                          train={"max_steps": None, "epochs": 3}))
        with pytest.raises((EmptyEpoch, ValueError), match=r"00000.tar.*no_text 12"):
            Trainer(exp, tmp_path / f"run{in_memory}").train()


def test_an_epoch_resumed_at_its_end_is_not_taken_for_an_empty_one(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    write_tar(root / "00000.tar", [make_sample(f"s{i}", i) for i in range(16)])
    exp = experiment_from_dict(config(root / "00000.tar", train={"max_steps": None, "epochs": 2}))
    first = Trainer(experiment_from_dict(config(root / "00000.tar", train={"max_steps": 2})), tmp_path / "run")
    first.train()  # stops after the epoch's last step, its checkpoint written there
    assert first.step == 2 and first.epoch == 0  # the epoch's data has not been seen to end yet
    resumed = Trainer(exp, tmp_path / "run")
    assert (resumed.step, resumed.epoch) == (2, 0) and not resumed.loader.at_epoch_start()
    resumed.train()
    assert resumed.step == 4 and resumed.epoch == 1  # the empty rest of epoch 0 passed without an error


def test_training_on_a_shard_set_whose_writer_stopped_warns(tmp_path, caplog):
    from conftest import make_shard_set

    root = tmp_path / "shards"
    make_shard_set(root, [8, 8])
    (root / ".00002.tar.partial").write_bytes(b"")
    with caplog.at_level("WARNING", logger="vlp.train.loop"):
        Trainer(experiment_from_dict(config(root / "{00000..00001}.tar")), tmp_path / "run")
    assert "data.train[0].shards: an incomplete shard set" in caplog.text and ".00002.tar.partial" in caplog.text


def test_errors_a_user_can_act_on_are_one_line_naming_the_key_or_file(tmp_path):
    """A YAML tag in --set, a replaced training.pt, a batch size of 0: each one line from the CLI, no traceback."""
    import subprocess
    import sys

    from conftest import REPO

    def vlp_train(*args):
        done = subprocess.run([sys.executable, "-m", "vlp", "train", str(REPO / "configs" / "digits-tiny.yaml"),
                               "--smoke", "--run-dir", str(tmp_path / "run"), *args], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        return done.returncode, done.stderr.strip().splitlines()

    code, err = vlp_train("--set", "data.batch_size=!!python/object/apply:os.system [echo]")
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("vlp train: config error: --set 'data.batch_size=!!python") and "not a plain" in err[-1]
    code, err = vlp_train("--set", "data.batch_size=0")
    assert code == 2 and err[-1].endswith("data.batch_size: 0 (needs 1 or more)")
    assert vlp_train("--set", "train.max_steps=1")[0] == 0
    latest = tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()

    class Payload:  # what weights-only loading must refuse: an object that runs code when unpickled
        def __reduce__(self):
            return (print, ("unpickled",))

    torch.save({"step": 1, "payload": Payload()}, latest / "training.pt")
    code, err = vlp_train("--set", "train.max_steps=2")
    assert code == 2 and "Traceback" not in "\n".join(err) and "unpickled" not in "\n".join(err)
    assert err[-1].startswith(f"vlp train: error: {latest / 'training.pt'}: refused")


def test_a_checkpoint_that_does_not_fit_the_model_is_an_error_naming_it(tmp_path):
    from vlp.train.checkpoint import CheckpointError

    Trainer(experiment_from_dict(config(train={"max_steps": 1})), tmp_path).train()
    other = experiment_from_dict(config(model={"name": "vlp-tiny-64"}, train={"max_steps": 2}))
    with pytest.raises(CheckpointError, match=r"step-0000001: does not fit this run's model and optimizer .*"
                                              r"model.pretrained: .*step-0000001/model.safetensors"):
        Trainer(other, tmp_path)
