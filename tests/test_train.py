"""The training engine on CPU: exact resume, accumulation semantics, divergence, checkpoints, parameter rules."""
from __future__ import annotations

import json
import math
import signal

import open_clip
import pytest
import torch

from conftest import make_shard_set
from vlp.config import experiment_from_dict
from vlp.data.preprocess import normalize_batch
from vlp.models import split_state
from vlp.models.trim import TrimmedConv2d
from vlp.train import checkpoint
from vlp.train.distributed import DistInfo
from vlp.train.loop import Trainer, TrainingDiverged, build_loader


def experiment(shards, **sections):
    data = {"name": "t", "data": {"train": [{"shards": str(shards)}], "batch_size": 8, "workers": 0,
                                  "shuffle_buffer": 16},
            "model": {"name": "vlp-tiny-32"}, "train": {"epochs": 2, "log_every": 1},
            "optim": {"lr": 1e-3}, "schedule": {"warmup_steps": 2}}
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return experiment_from_dict(data)


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-shards")
    make_shard_set(root, [21, 19])  # 40 samples: 5 batches of 8 per epoch
    return root


@pytest.mark.parametrize("ema,in_memory", [(None, False), (0.9, False), (None, True)])
def test_a_killed_and_resumed_run_ends_with_identical_weights(shards, tmp_path, ema, in_memory):
    exp = experiment(shards, data={"workers": 2, "in_memory": in_memory}, train={"checkpoint_every": 100, "ema": ema})
    full = Trainer(exp, tmp_path / "full")
    full.train()
    # streamed: 2 workers x 20 samples, batches of 8, 8, 4 each; in memory: 40 samples, batches of 8
    assert (full.step, full.epoch) == ((10, 1) if in_memory else (12, 1))

    first = Trainer(exp, tmp_path / "killed")
    real_step = first.train_step

    def step_then_signal(micro):
        real_step(micro)
        if first.step == 7:  # SIGTERM inside the second epoch, during step 8
            first._on_sigterm(signal.SIGTERM, None)

    first.train_step = step_then_signal
    first.train()
    stop = 9  # step 9 carries the flag to every rank
    assert first.step == stop and checkpoint.latest(tmp_path / "killed").name == f"step-{stop:07d}"
    resumed = Trainer(exp, tmp_path / "killed")
    assert resumed.step == stop and resumed.epoch == 1
    resumed.train()
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run must follow the uninterrupted one exactly"
    if ema:  # the average too, and its update count (which sets the warm-up decay)
        assert resumed.ema.updates == full.ema.updates == full.step
        assert all(torch.equal(full.ema.shadow[k], resumed.ema.shadow[k]) for k in a)


def test_ema_checkpoint_holds_the_average_and_the_online_weights_beside_it(shards, tmp_path):
    trainer = Trainer(experiment(shards, train={"max_steps": 4, "ema": 0.5}), tmp_path)
    expected = {k: v.clone() for k, v in weights(trainer).items() if v.is_floating_point()}
    real_step = trainer.train_step

    def step_and_average(micro):  # the recurrence by hand: decay min(0.5, (1 + n) / (10 + n)) at update n
        record = real_step(micro)
        n = trainer.ema.updates
        decay = min(0.5, (1 + n) / (10 + n))
        for k, v in weights(trainer).items():
            if k in expected:
                expected[k] = decay * expected[k] + (1 - decay) * v
        return record

    trainer.train_step = step_and_average
    trainer.train()
    assert [min(0.5, (1 + n) / (10 + n)) for n in (1, 2, 3, 4)] == [2 / 11, 3 / 12, 4 / 13, 5 / 14]
    path = checkpoint.latest(tmp_path)
    average, online = checkpoint.load(path)[0], checkpoint.load_online(path)
    final = weights(trainer)
    assert all(torch.equal(online[k], final[k]) for k in final)
    moved = 0
    for k in expected:
        assert torch.allclose(average[k], expected[k], atol=1e-6), k
        moved += not torch.allclose(average[k], final[k], atol=1e-4)
    assert moved > len(expected) // 2, "the average must differ from the last weights"
    # the average is a plain open_clip checkpoint too
    model = open_clip.create_model("vlp-tiny-32", pretrained=str(path / "model.safetensors"))
    assert torch.equal(model.state_dict()["text_projection"], average["clip.text_projection"])
    # evaluation sees the average, training keeps its own weights
    with trainer.ema.applied(trainer.raw_model) as m:
        assert torch.equal(m.clip.text_projection, average["clip.text_projection"])
    assert torch.equal(trainer.raw_model.clip.text_projection, final["clip.text_projection"])


def test_ema_settings_that_cannot_work_are_errors(shards, tmp_path):
    with pytest.raises(ValueError, match="train.ema: 1.5"):
        Trainer(experiment(shards, train={"max_steps": 1, "ema": 1.5}), tmp_path / "a")
    Trainer(experiment(shards, train={"max_steps": 1}), tmp_path / "b").train()
    with pytest.raises(ValueError, match="without an EMA"):  # resuming a plain run with an EMA
        Trainer(experiment(shards, train={"max_steps": 2, "ema": 0.9}), tmp_path / "b")


def test_accumulation_gives_the_big_batch_gradient(shards, tmp_path):
    def first_step_grads(batch_size, accum):
        exp = experiment(shards, data={"batch_size": batch_size, "shuffle_buffer": 0, "scale": [1.0, 1.0]},
                         train={"accum_steps": accum, "max_steps": 1})
        trainer = Trainer(exp, tmp_path / f"acc{accum}")
        captured = {}

        def capture(closure=None):
            if not captured:  # the first call is the training step (checkpointing may call it again)
                captured.update({n: p.grad.clone() for n, p in trainer.raw_model.named_parameters()
                                 if p.grad is not None})

        trainer.optimizer.step = capture
        trainer.train()
        return trainer.last_record["loss"], captured

    loss_big, big = first_step_grads(16, 1)
    loss_acc, acc = first_step_grads(8, 2)
    assert math.isclose(loss_big, loss_acc, rel_tol=1e-5)
    assert big.keys() == acc.keys()
    for name in big:
        assert torch.allclose(big[name], acc[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("bad_step", [3, 4])
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shards, tmp_path, bad_step):
    """The host reads the step's loss after the backward and raises before the optimizer steps (bad step 3), and
    before the checkpoint of the bad step is written (bad step 4)."""
    exp = experiment(shards, train={"checkpoint_every": 2, "max_steps": 6})
    trainer = Trainer(exp, tmp_path)
    real_step = trainer.train_step

    before = {}

    def poisoned(micro):
        if trainer.step == bad_step - 1:
            with torch.no_grad():
                trainer.raw_model.clip.logit_scale.fill_(float("nan"))
            before.update(weights(trainer))
        return real_step(micro)

    trainer.train_step = poisoned
    with pytest.raises(TrainingDiverged, match=rf"loss became nan at step {bad_step} .*step-0000002"):
        trainer.train()
    # the optimizer never moved a weight
    after = weights(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before if k != "clip.logit_scale")
    assert any(p.grad is not None for p in trainer.raw_model.parameters())  # the backward ran before the check
    model_state, state = checkpoint.load(checkpoint.latest(tmp_path))
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in model_state.values())
    if bad_step == 3:  # the checkpoint holds the weights of step 2, the last good one
        assert all(torch.equal(model_state[k], before[k]) for k in before if k != "clip.logit_scale")


def test_checkpoint_loads_in_open_clip(shards, tmp_path):
    trainer = Trainer(experiment(shards, train={"max_steps": 1}), tmp_path)
    trainer.train()
    path = checkpoint.latest(tmp_path) / "model.safetensors"
    model, _, preprocess = open_clip.create_model_and_transforms("vlp-tiny-32", pretrained=str(path))
    ours = trainer.raw_model.clip.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in model.state_dict().items())


def test_an_interrupted_checkpoint_write_keeps_the_previous_one(shards, tmp_path, monkeypatch):
    trainer = Trainer(experiment(shards, train={"max_steps": 1}), tmp_path)
    trainer.train()
    good = checkpoint.latest(tmp_path)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken)
    trainer.step = 2
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    assert checkpoint.latest(tmp_path) == good
    assert checkpoint.load(good)[1]["step"] == 1


def test_parameter_rules_freeze_a_tower_and_drop_weight_decay(shards, tmp_path):
    rules = [{"pattern": r".*bias", "weight_decay": 0.0}, {"pattern": r"visual\..*", "freeze": True}]
    trainer = Trainer(experiment(shards, optim={"rules": rules}, train={"max_steps": 2}), tmp_path)
    before = weights(trainer)
    trainer.train()
    after = weights(trainer)
    # the rules name parameters as open_clip does (model.safetensors' names)
    visual = [k for k in before if k.startswith("clip.visual.")]
    text = [k for k in before if k.startswith("clip.transformer.") and k.endswith("weight")]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)
    assert all(not torch.equal(before[k], after[k]) for k in text)
    decays = {g["weight_decay"] for g in trainer.optimizer.param_groups}
    assert decays == {0.0, 0.1}


def test_siglip_objective_trains(shards, tmp_path):
    exp = experiment(shards, model={"init_logit_bias": -10.0, "init_logit_scale": math.log(10)},
                     objectives=[{"name": "siglip"}], train={"max_steps": 3})
    trainer = Trainer(exp, tmp_path)
    record = trainer.train()
    assert record["logit_bias"] != -10.0  # the bias trains, in the objective's metrics
    # at the start every logit is about 10 * cos - 10 = -10: each image's positive costs -log(sigmoid(-10)) = 10
    # and its negatives almost nothing, so the loss (per image) starts near 10 and falls as pairs separate
    first = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])["loss"]
    assert abs(first - 10.0) < 1.0 and record["loss"] < first - 2
    from vlp.eval.models import load_model

    loaded = load_model(str(tmp_path)).model  # the run folder: rebuilt from its config (model.init_logit_bias)
    assert torch.equal(loaded.clip.logit_bias, trainer.raw_model.clip.logit_bias.detach())
    # the same weights as open_clip_train writes them (epoch_N.pt: a DDP-prefixed state dict inside a dict), whose
    # logit bias the config name alone would not create
    state = {f"module.{k}": v for k, v in trainer.raw_model.clip.state_dict().items()}
    torch.save({"epoch": 3, "name": "siglip", "state_dict": state}, tmp_path / "epoch_3.pt")
    loaded = load_model(f"vlp-tiny-32:{tmp_path / 'epoch_3.pt'}").model
    assert torch.equal(loaded.clip.logit_bias, trainer.raw_model.clip.logit_bias.detach())


def test_k_captions_per_sample_train_and_a_bad_setting_names_the_key(tmp_path):
    root = tmp_path / "shards"
    make_shard_set(root, [16], captions=["a red square", "a blue circle", "a green dot"])
    exp = experiment(root, data={"caption": "random", "captions_per_sample": 2}, train={"max_steps": 2})
    trainer = Trainer(exp, tmp_path / "run")
    trainer.train()
    first = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])["loss"]
    assert abs(first - math.log(8)) < 0.3  # the mean of two InfoNCE losses over 8 pairs at chance (a sum: 4.2)
    trainer.loader.set_epoch(1)
    batch = next(iter(trainer.loader))  # what the objective saw: 8 images, 2 caption rows each
    assert batch["image"].shape[0] == 8 and batch["text"].shape[0] == 16
    with pytest.raises(ValueError, match="data.captions_per_sample"):  # when the config loads
        experiment(root, data={"caption": "first", "captions_per_sample": 2})


def test_fused_adamw_takes_the_same_steps_as_the_default_one(shards, tmp_path):
    def trained(fused: bool):
        trainer = Trainer(experiment(shards, optim={"fused": fused}, train={"max_steps": 3}), tmp_path / str(fused))
        assert bool(trainer.optimizer.defaults["fused"]) == fused
        trainer.train()
        return weights(trainer)

    fused, default = trained(True), trained(False)
    assert all(torch.allclose(fused[k], default[k], atol=1e-5) for k in fused)


def test_channels_last_trains_the_same_weights_and_saves_plain_ones(shards, tmp_path):
    def trained(channels_last: bool):
        exp = experiment(shards, model={"name": "vlp-r10t-32-t2", "channels_last": channels_last},
                         train={"max_steps": 3})
        trainer = Trainer(exp, tmp_path / str(channels_last))
        conv = trainer.raw_model.clip.visual.trunk.conv1[0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        start = weights(trainer)
        trainer.train()
        return start, weights(trainer)

    (start, last), (start_plain, plain) = trained(True), trained(False)
    assert all(torch.equal(start[k], start_plain[k]) for k in start)
    # AdamW normalises each update to about lr, so a tiny gradient whose sign the layout's rounding flips moves
    # its weight by ~lr either way: single entries may differ by 1e-3 after 3 steps (seen on an AVX-512 host).
    # What the layout must not change is the update as a whole: per tensor, the two runs' updates differ by at
    # most 10% of their size here (median 2e-5); a layout mix-up makes them unrelated (a difference near 1.4x).
    for k in last:
        moved, moved_plain = last[k].float() - start[k].float(), plain[k].float() - start[k].float()
        assert (moved - moved_plain).norm() <= 0.25 * moved_plain.norm() + 1e-12, k
    saved, _ = checkpoint.load(checkpoint.latest(tmp_path / "True"))
    assert all(v.is_contiguous() for v in saved.values())
    open_clip.create_model("vlp-r10t-32-t2").load_state_dict(split_state(saved)[0])
    with pytest.raises(ValueError, match="model.channels_last cannot be combined with train.fsdp"):
        Trainer(experiment(shards, model={"channels_last": True}, train={"fsdp": True}), tmp_path / "fsdp")


def test_uint8_batches_are_normalised_by_the_trainer_as_the_loader_would(shards, tmp_path):
    # On an accelerator the loaders hand over uint8 images (a quarter of the bytes to copy) and the trainer
    # normalises them after the copy: the step must be the one a normalised batch gives.
    exp = experiment(shards, train={"max_steps": 2})
    plain, raw = Trainer(exp, tmp_path / "plain"), Trainer(exp, tmp_path / "raw")
    batch = next(iter(plain.loader))
    assert batch["image"].dtype == torch.float32  # on the CPU the loader normalises
    images = torch.randint(0, 256, batch["image"].shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pp = open_clip.get_model_preprocess_cfg(plain.raw_model.clip)
    before = weights(plain)
    plain.train_step([{**batch, "image": normalize_batch(images, pp["mean"], pp["std"])}])
    raw.train_step([{**batch, "image": images}])
    after_plain, after_raw = weights(plain), weights(raw)
    assert not torch.equal(after_plain["clip.visual.conv1.weight"], before["clip.visual.conv1.weight"])
    assert all(torch.equal(after_plain[k], after_raw[k]) for k in after_plain)

    for in_memory in (False, True):  # a CUDA trainer's loaders keep uint8 (building one needs no GPU)
        loader = build_loader(experiment(shards, data={"in_memory": in_memory}).data, plain.raw_model.clip,
                              open_clip.get_tokenizer("vlp-tiny-32"), DistInfo(device=torch.device("cuda")), 0)
        opts = loader.opts if in_memory else loader.stream.opts
        assert opts.normalize is False


@pytest.mark.parametrize("max_steps,starts", [(None, 2), (4, 1)])
def test_the_next_epochs_workers_start_early_only_if_the_run_reaches_it(shards, tmp_path, max_steps, starts):
    # 2 epochs of 6 steps: epoch 1's workers start during epoch 0; none start for an epoch 2 the run never sees,
    # nor for epoch 1 when max_steps ends the run in epoch 0
    trainer = Trainer(experiment(shards, data={"workers": 2}, train={"max_steps": max_steps}), tmp_path)
    started, real_start = [], trainer.loader._start
    trainer.loader._start = lambda epoch, positions: started.append(epoch) or real_start(epoch, positions)
    trainer.train()
    assert trainer.step == (max_steps or 12)
    assert started == list(range(starts))


def test_trimmed_convolutions_and_packed_text_train_the_same_weights(shards, tmp_path):
    def trained(faster: bool):
        exp = experiment(shards, model={"name": "vlp-r10t-32-t2", "trim_dead_taps": faster, "pack_text": faster},
                         train={"max_steps": 3})
        trainer = Trainer(exp, tmp_path / str(faster))
        assert isinstance(trainer.raw_model.clip.visual.trunk.layer4[0].conv2, TrimmedConv2d) == faster
        assert trainer.raw_model.packed == faster
        # packed, the model's inputs carry the packing plan, worked out on the host
        assert ("text_plan" in trainer._inputs(next(iter(trainer.loader)))) == faster
        # open_clip's text Transformer module runs only where the tower is not packed
        padded_calls = []
        trainer.raw_model.clip.transformer.register_forward_hook(lambda *args: padded_calls.append(1))
        trainer.train()
        assert len(padded_calls) == (0 if faster else 3)  # one padded forward per step, or none
        return weights(trainer)

    faster, plain = trained(True), trained(False)
    # the same tolerance as channels-last above: rounding shows up to ~1e-4, 3 steps move every matrix by 1.6e-3+
    assert all(torch.allclose(faster[k].float(), plain[k].float(), atol=5e-4) for k in faster)
    saved, _ = checkpoint.load(checkpoint.latest(tmp_path / "True"))
    open_clip.create_model("vlp-r10t-32-t2").load_state_dict(split_state(saved)[0])


def test_compiling_one_tower_keeps_plain_checkpoint_names(shards, tmp_path):
    trainer = Trainer(experiment(shards, model={"compile": "visual"}, train={"max_steps": 2}), tmp_path)
    assert trainer.raw_model.clip.visual._compiled_call_impl is not None  # nn.Module.compile() ran on the image tower
    assert trainer.raw_model.clip.transformer._compiled_call_impl is None
    eager = Trainer(experiment(shards, train={"max_steps": 2}), tmp_path / "eager").train()
    assert math.isclose(trainer.train()["loss"], eager["loss"], rel_tol=1e-4)  # compiled, the same computation
    saved, _ = checkpoint.load(checkpoint.latest(tmp_path))
    assert set(saved) == {f"clip.{k}" for k in open_clip.create_model("vlp-tiny-32").state_dict()}
    with pytest.raises(ValueError, match="model.compile: 'vision'"):
        Trainer(experiment(shards, model={"compile": "vision"}), tmp_path / "bad")


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(shards, tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    config = tmp_path / "exp.yaml"
    config.write_text(json.dumps({"name": "term", "model": {"name": "vlp-tiny-32"},
                                  "data": {"train": [{"shards": str(shards)}], "batch_size": 4, "workers": 0},
                                  "train": {"epochs": 1000, "log_every": 1}}))
    proc = subprocess.Popen([sys.executable, "-m", "vlp", "train", str(config), "--run-dir", str(tmp_path / "run")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM: checkpoint at step" in out
    step = checkpoint.load(checkpoint.latest(tmp_path / "run"))[1]["step"]
    assert step >= 2 and f"step-{step:07d}" == checkpoint.latest(tmp_path / "run").name


def test_pretrained_weights_file_initialises_the_model(shards, tmp_path):
    first = Trainer(experiment(shards, train={"max_steps": 1}), tmp_path / "a")
    first.train()
    weights_file = checkpoint.latest(tmp_path / "a") / "model.safetensors"
    second = Trainer(experiment(shards, model={"pretrained": str(weights_file)}, train={"max_steps": 1}),
                     tmp_path / "b")
    a, b = weights(first), weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_gives_the_same_gradients(shards, tmp_path):
    def grads(checkpointing):
        exp = experiment(shards, model={"grad_checkpointing": checkpointing}, train={"max_steps": 1},
                         data={"shuffle_buffer": 0})
        trainer = Trainer(exp, tmp_path / str(checkpointing))
        out = {}
        trainer.optimizer.step = lambda closure=None: out or out.update(
            {n: p.grad.clone() for n, p in trainer.raw_model.named_parameters()})
        trainer.train()
        return out

    plain, checkpointed = grads(False), grads(True)
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_drop_last_keeps_only_full_batches(shards, tmp_path):
    trainer = Trainer(experiment(shards, data={"workers": 2, "drop_last": True}, train={"epochs": 1}), tmp_path)
    assert trainer.total_steps == 4  # 2 workers x 20 samples: 2 full batches of 8 each, the 4 left over dropped
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_log_lines_carry_the_interval_mean_loss_and_threads_apply(shards, tmp_path):
    threads = torch.get_num_threads()
    wanted = 2 if threads == 1 else 1  # not the current count, so the assertion can fail
    try:
        with pytest.raises(ValueError, match="train.threads"):
            Trainer(experiment(shards, train={"threads": 0}), tmp_path / "bad")
        trainer = Trainer(experiment(shards, train={"epochs": 1, "log_every": 2, "threads": wanted}), tmp_path)
        assert torch.get_num_threads() == wanted
        losses = []
        real_step = trainer.train_step

        def step(micro):
            real_step(micro)
            losses.append(trainer.last_record["loss"])

        trainer.train_step = step
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 5]  # 40 samples, batch 8; the last step is always logged
    assert [r["loss"] for r in rows] == [losses[1], losses[3], losses[4]]
    expected = [(losses[0] + losses[1]) / 2, (losses[2] + losses[3]) / 2, losses[4]]
    assert [r["loss_mean"] for r in rows] == pytest.approx(expected, rel=1e-9)


def test_each_checkpoint_is_written_once_and_the_last_step_always(shards, tmp_path, monkeypatch):
    written = []
    real_save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda run_dir, step, *a, **k: written.append(step) or
                        real_save(run_dir, step, *a, **k))
    for max_steps in (4, 5):  # the last step due for a checkpoint, or not
        written.clear()
        trainer = Trainer(experiment(shards, train={"max_steps": max_steps, "checkpoint_every": 2}),
                          tmp_path / f"{max_steps}")
        trainer.train()
        assert written == [2, 4] if max_steps == 4 else written == [2, 4, 5]


def test_default_rules_keep_weight_decay_off_every_1d_tensor_as_open_clip_does():
    from vlp.config import OptimConfig
    from vlp.train.optim import param_groups

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))  # BatchNorm's scale is "1.weight": no name says "norm"
    model.positional_embedding = torch.nn.Parameter(torch.zeros(5, 4))
    decay = {id(p): g["weight_decay"] for g in param_groups(model, OptimConfig(weight_decay=0.2)) for p in g["params"]}
    by_name = {name: decay[id(p)] for name, p in model.named_parameters()}
    assert by_name == {"positional_embedding": 0.0, "0.weight": 0.2, "0.bias": 0.0, "1.weight": 0.0, "1.bias": 0.0,
                       "3.weight": 0.2, "3.bias": 0.0}


def test_schedules_warm_up_then_hold_or_decay_to_the_floor():
    from vlp.config import ScheduleConfig
    from vlp.train.optim import lr_factor

    def curve(name, floor=0.0):
        return [lr_factor(s, 12, ScheduleConfig(name=name, warmup_steps=2, min_lr_ratio=floor)) for s in range(12)]

    assert curve("constant") == [0.5] + [1.0] * 11
    linear, cosine = curve("linear"), curve("cosine", floor=0.1)
    assert linear[:3] == [0.5, 1.0, 1.0] and linear[-1] == pytest.approx(0.1)  # 0 would be step 12, after the run
    assert linear[6] == pytest.approx(0.6)
    assert all(a - b == pytest.approx(0.1) for a, b in zip(linear[2:], linear[3:]))  # straight
    assert cosine[2] == 1.0 and cosine[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert cosine[6] > linear[6]  # a cosine stays high longer
    with pytest.raises(ValueError, match="schedule.name: unknown schedule 'step'"):
        lr_factor(5, 12, ScheduleConfig(name="step"))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Caption and label samples alternating, each with one of 3 classes: data for a prefix and a head."""
    from conftest import make_sample, write_tar

    root = tmp_path_factory.mktemp("labelled")
    for shard in range(2):
        write_tar(root / f"{shard:05d}.tar", [make_sample(f"s{i:04d}", i, kind="label" if i % 2 else "caption",
                                                          label=i % 3) for i in range(20 * shard, 20 * shard + 20)])
    return root


PARTS = {"prefix": {"type": "text_prefix", "kinds": ["caption", "label"], "length": 2},
         "head": {"type": "linear_head", "classes": 3}}
TWO_OBJECTIVES = [{"name": "clip"}, {"name": "classify", "weight": 0.5, "options": {"head": "head"}}]


def test_a_model_with_parts_resumes_exactly_and_evaluates_with_them(labelled, tmp_path):
    from vlp.eval.models import ModelSpecError, load_model

    exp = experiment(labelled, model={"parts": PARTS}, objectives=TWO_OBJECTIVES,
                     train={"checkpoint_every": 100, "ema": 0.9, "accum_steps": 2})
    full = Trainer(exp, tmp_path / "full")
    full.train()
    assert full.step == 4 and "acc_head" in full.last_record  # 2 epochs of 40 samples in 2 steps of 2 x 8 each
    first = Trainer(exp, tmp_path / "killed")
    real_step = first.train_step

    def step_then_signal(micro):
        real_step(micro)
        if first.step == 1:  # SIGTERM during step 2: every rank stops after step 3
            first._on_sigterm(signal.SIGTERM, None)

    first.train_step = step_then_signal
    first.train()
    assert first.step == 3  # stopped inside the second epoch
    folder = checkpoint.latest(tmp_path / "killed")
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "parts.safetensors", "online.safetensors",
                                                 "online-parts.safetensors"}
    resumed = Trainer(exp, tmp_path / "killed")
    resumed.train()
    a, b = weights(full), weights(resumed)
    assert any(k.startswith("parts.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run must follow the uninterrupted one exactly"
    assert all(torch.equal(full.ema.shadow[k], resumed.ema.shadow[k]) for k in a)

    path = checkpoint.latest(tmp_path / "full")
    plain = open_clip.create_model("vlp-tiny-32", pretrained=str(path / "model.safetensors"))  # strict: no extras
    average = {k: v for k, v in full.ema.shadow.items()}
    assert torch.equal(plain.state_dict()["text_projection"], average["clip.text_projection"])
    # vlp eval rebuilds the run's model, prefix and head included, from the run folder's config.yaml
    loaded = load_model(str(tmp_path / "full"))
    assert loaded.describe["text_kind"] == "caption" and loaded.describe["parts"] == ["head", "prefix"]
    texts = ["a photo of a cat.", "a dog running"]
    tokens = open_clip.get_tokenizer("vlp-tiny-32")(texts)
    with full.ema.applied(full.raw_model) as model, torch.no_grad():
        model.eval()
        expected = model.encode_text(tokens, kind="caption")
        as_label = model.encode_text(tokens, kind="label")
    assert torch.allclose(loaded.encode_text(texts), expected, atol=1e-5)
    assert not torch.allclose(loaded.encode_text(texts), as_label, atol=1e-3)
    assert torch.allclose(load_model(str(path), text_kind="label").encode_text(texts), as_label, atol=1e-5)
    with pytest.raises(ModelSpecError, match="parts.safetensors beside it"):  # never silently without the prefix
        load_model(f"vlp-tiny-32:{path / 'model.safetensors'}")
    with pytest.raises(ModelSpecError, match="text kind 'prompt'"):
        load_model(str(path), text_kind="prompt")


def test_accumulation_merges_a_heads_rows_with_two_objectives(labelled, tmp_path):
    def first_step_grads(batch_size, accum):
        exp = experiment(labelled, data={"batch_size": batch_size, "shuffle_buffer": 0, "scale": [1.0, 1.0]},
                         model={"parts": PARTS}, objectives=TWO_OBJECTIVES,
                         train={"accum_steps": accum, "max_steps": 1})
        trainer = Trainer(exp, tmp_path / f"acc{accum}")
        captured = {}

        def capture(closure=None):
            if not captured:
                captured.update({n: p.grad.clone() for n, p in trainer.raw_model.named_parameters()
                                 if p.grad is not None})

        trainer.optimizer.step = capture
        trainer.train()
        return trainer.last_record, captured

    big_record, big = first_step_grads(16, 1)
    acc_record, acc = first_step_grads(8, 2)
    for key in ("loss", "loss_clip", "loss_classify", "acc_head"):
        assert math.isclose(big_record[key], acc_record[key], rel_tol=1e-5), key
    assert "parts.head.linear.weight" in big and big.keys() == acc.keys()
    for name in big:
        assert torch.allclose(big[name], acc[name], atol=1e-5, rtol=1e-4), name


def test_default_cpu_training_is_repeatable_on_several_threads(tmp_path):
    """Two runs of the same command end with the same weights at a batch large enough that torch's CPU kernels
    split work over threads (a backward that accumulated in thread order made 84 of 98 tensors differ after 3
    steps of this run)."""
    from vlp.config import load_experiment
    from conftest import REPO

    def run(folder):
        exp = load_experiment(REPO / "configs" / "digits-tiny.yaml",
                              ["train.max_steps=3", "eval.suite=null", "train.threads=2", "data.batch_size=256",
                               "data.workers=0", "train.log_every=100"])
        threads = torch.get_num_threads()
        try:
            trainer = Trainer(exp, tmp_path / folder)
            assert trainer.raw_model.packed  # the default text tower
            trainer.train()
        finally:
            torch.set_num_threads(threads)
        return weights(trainer)

    first, second = run("a"), run("b")
    assert [k for k in first if not torch.equal(first[k], second[k])] == []


def test_steps_replayed_after_a_resume_are_logged_once(shards, tmp_path):
    """A run killed after its checkpoint of step 4 had logged steps 5 and 6 (and half a line): resumed, it replays
    them, and log.jsonl keeps one line per step."""
    import shutil

    exp = experiment(shards, train={"max_steps": 6, "checkpoint_every": 4, "keep_checkpoints": 3})
    Trainer(exp, tmp_path).train()
    root = tmp_path / "checkpoints"
    shutil.rmtree(root / "step-0000006")  # as if killed before that checkpoint
    (root / "latest").write_text("step-0000004\n")
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a line cut short by the kill
    resumed = Trainer(exp, tmp_path)
    assert resumed.step == 4
    resumed.train()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_sigterm_ends_a_run_that_cannot_stop_cleanly_within_the_grace(tmp_path):
    """A loader that never delivers (here a pipe that stays silent) keeps the step from finishing: the process
    exits anyway, stop_grace seconds after SIGTERM, saying why."""
    import subprocess
    import sys
    import time

    from conftest import REPO

    config = tmp_path / "exp.yaml"
    config.write_text(json.dumps({"name": "stuck", "model": {"name": "vlp-tiny-32"},
                                  "data": {"train": [{"shards": "pipe:sleep 30"}], "batch_size": 4, "workers": 0},
                                  "train": {"max_steps": 10, "stop_grace": 2}}))
    with open(tmp_path / "stderr", "w") as stderr:  # a file: the pipe's child keeps inherited pipes open
        proc = subprocess.Popen([sys.executable, "-m", "vlp", "train", str(config), "--run-dir",
                                 str(tmp_path / "run")], cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("training stuck"):
                break
        time.sleep(1)  # inside the first read of the pipe
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 143 and time.monotonic() - sent < 10
        err = (tmp_path / "stderr").read_text()
        assert "not stopped cleanly 2 s after SIGTERM" in err and "exiting without a checkpoint" in err
    finally:
        proc.kill()
