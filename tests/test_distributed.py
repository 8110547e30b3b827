"""Two processes (gloo, CPU) train as one process with the same global batch."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from conftest import REPO, make_sample, make_shard_set, write_tar
from vlp.config import experiment_from_dict
from vlp.models import split_state

BATCH = 8  # per rank


def experiment(shards, batch_size, **train):
    # scale (1, 1) on square images makes the crop the whole image, so both runs see identical pixels even
    # though their augmentation generators differ (they are seeded per worker slot).
    return experiment_from_dict({
        "name": "dist", "model": {"name": "vlp-tiny-32"},
        "data": {"train": [{"shards": str(shards)}], "batch_size": batch_size, "workers": 0, "shuffle_buffer": 0,
                 "scale": [1.0, 1.0]},
        "train": {"max_steps": 1, "log_every": 1, **train}, "optim": {"clip_grad": None}})


def first_step(exp, run_dir) -> tuple[float, dict]:
    from vlp.train.loop import Trainer

    trainer = Trainer(exp, run_dir)
    grads = {}

    def capture(closure=None):
        if not grads:  # FSDP gradients are sharded DTensors: compare the whole tensors
            grads.update({n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                          for n, p in trainer.raw_model.named_parameters()})

    trainer.optimizer.step = capture
    trainer.train()
    return trainer.last_record["loss"], grads


def configure(exp, objective: str, memory_cl: bool):
    exp.objectives[0].name = objective
    exp.model.init_logit_bias = -10.0 if objective == "siglip" else None
    exp.data.in_memory = exp.model.channels_last = memory_cl  # the in-memory loader, channels-last images
    return exp


def _rank(rank: int, world: int, port: int, shards: str, out: str, objective: str, fsdp: bool,
          memory_cl: bool) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    exp = configure(experiment(shards, BATCH, fsdp=fsdp), objective, memory_cl)
    loss, grads = first_step(exp, f"{out}/run")
    torch.save({"loss": loss, "grads": grads}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("objective, fsdp, memory_cl", [("clip", False, False), ("siglip", False, False),
                                                       ("clip", True, False), ("clip", False, True)],
                         ids=["clip-ddp", "siglip-ddp", "clip-fsdp", "clip-ddp-in-memory-channels-last"])
def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path, objective, fsdp, memory_cl):
    shards = tmp_path / "shards"
    make_shard_set(shards, [2 * BATCH])  # rank r reads samples [r*B, (r+1)*B): together the single batch
    mp.spawn(_rank, args=(2, free_port(), str(shards), str(tmp_path), objective, fsdp, memory_cl), nprocs=2,
             join=True)

    exp = configure(experiment(shards, 2 * BATCH), objective, memory_cl)
    loss, grads = first_step(exp, tmp_path / "single")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in ranks:
        assert abs(result["loss"] - loss) < 1e-5
        for name, grad in grads.items():
            assert torch.allclose(result["grads"][name], grad, atol=1e-5, rtol=1e-4), name


PARTS = {"prefix": {"type": "text_prefix", "kinds": ["caption", "label"], "length": 2},
         "head": {"type": "linear_head", "classes": 3}}


def labelled_shards(root, n: int) -> None:
    """Caption and label samples alternating (each with a class), for a model with a prefix and a head."""
    root.mkdir(parents=True, exist_ok=True)
    write_tar(root / "00000.tar", [make_sample(f"s{i:04d}", i, kind="label" if i % 2 else "caption", label=i % 3)
                                   for i in range(n)])


HEAD_AND_CLIP = [{"name": "clip"}, {"name": "classify", "weight": 0.5, "options": {"head": "head"}}]
BY_CLASS = [{"name": "group_contrast"}, {"name": "classify", "weight": 0.5, "options": {"head": "head"}}]


def parts_experiment(shards, batch_size, accum_steps=2, objectives=HEAD_AND_CLIP):
    exp = experiment(shards, batch_size, accum_steps=accum_steps)
    exp.model.parts = PARTS
    exp.objectives = experiment_from_dict({"name": "x", "objectives": objectives}).objectives
    return exp


def _parts_rank(rank: int, world: int, port: int, shards: str, out: str, objectives) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    loss, grads = first_step(parts_experiment(shards, BATCH // 2, objectives=objectives), f"{out}/run")
    torch.save({"loss": loss, "grads": grads}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("objectives", [HEAD_AND_CLIP, BY_CLASS], ids=["clip", "group-contrast"])
def test_a_model_with_a_prefix_and_a_head_on_two_ranks_with_accumulation_equals_one_process(tmp_path, objectives):
    """2 ranks x 2 micro-batches of 4 against 1 process with one batch of 16: the same samples in one contrastive
    batch (its class groups spanning ranks and micro-batches), the head's loss over all of them, the same gradient
    for every parameter, parts included."""
    shards = tmp_path / "shards"
    labelled_shards(shards, 2 * BATCH)
    mp.spawn(_parts_rank, args=(2, free_port(), str(shards), str(tmp_path), objectives), nprocs=2, join=True)
    loss, grads = first_step(parts_experiment(shards, 2 * BATCH, accum_steps=1, objectives=objectives),
                             tmp_path / "single")
    assert {"parts.prefix.vectors", "parts.head.linear.weight"} <= set(grads)
    assert grads["parts.prefix.vectors"].abs().sum(-1).gt(0).all()  # both kinds' vectors learn
    for r in range(2):
        result = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert abs(result["loss"] - loss) < 1e-5
        for name, grad in grads.items():
            assert torch.allclose(result["grads"][name], grad, atol=1e-5, rtol=1e-4), name


def test_torchrun_cli_runs_two_processes(tmp_path):
    shards = tmp_path / "shards"
    make_shard_set(shards, [13, 20, 7])  # uneven: ranks must still leave the epoch together
    config = tmp_path / "exp.yaml"
    config.write_text(json.dumps({
        "name": "torchrun", "model": {"name": "vlp-tiny-32"},
        "data": {"train": [{"shards": str(shards)}], "batch_size": 4, "workers": 1, "shuffle_buffer": 8},
        "train": {"epochs": 2, "log_every": 1, "checkpoint_every": 3}}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "vlp", "train", str(config), "--run-dir", str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # 40 samples, 20 per rank, 1 worker, batches of 4 with drop_last: 5 steps per epoch, 2 epochs
    assert [r["step"] for r in log] == list(range(1, 11))
    assert (tmp_path / "run" / "checkpoints" / "step-0000010" / "model.safetensors").exists()


def _fsdp_timm_rank(rank: int, world: int, port: int, shards: str, out: str) -> None:
    from vlp.train.loop import Trainer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    exp = experiment(shards, BATCH, fsdp=True, max_steps=2)
    exp.model.name = "vlp-r10t-32-t2"  # a timm CNN (BatchNorm buffers) in FSDP's root unit
    trainer = Trainer(exp, f"{out}/run")
    trainer.train()
    torch.distributed.destroy_process_group()


def test_fsdp_trains_a_timm_tower_and_saves_a_plain_checkpoint(tmp_path):
    import open_clip

    from vlp.train import checkpoint

    shards = tmp_path / "shards"
    make_shard_set(shards, [4 * BATCH])
    mp.spawn(_fsdp_timm_rank, args=(2, free_port(), str(shards), str(tmp_path)), nprocs=2, join=True)
    saved, state = checkpoint.load(checkpoint.latest(tmp_path / "run"))
    assert state["step"] == 2 and state["world_size"] == 2
    saved = split_state(saved)[0]
    model = open_clip.create_model("vlp-r10t-32-t2")
    model.load_state_dict(saved)  # whole tensors, plain names: the sharding does not leak into the file
    assert saved["token_embedding.weight"].shape == (49408, 128)
    assert int(saved["visual.trunk.bn1.num_batches_tracked"]) == 2  # the BatchNorm buffers went along
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # the loss is over the global batch of 16 (ranks gathered), at chance at the start: ln 16, not ln 8
    assert [r["step"] for r in log] == [1, 2] and abs(log[0]["loss"] - math.log(2 * BATCH)) < 0.5


def _fsdp_ema_rank(rank: int, world: int, port: int, shards: str, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from vlp.train.loop import Trainer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    exp = experiment(shards, BATCH, fsdp=True, max_steps=2, ema=0.5)
    exp.eval.suite, exp.eval.every = "digits", 2
    trainer = Trainer(exp, f"{out}/run")

    def snapshot():  # every rank: gathering the whole weights is collective
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        # cloned: on CPU the unsharded logit scale comes back as the live tensor itself
        return {k: v.clone() for k, v in get_model_state_dict(trainer.raw_model, options=options).items()}

    snapshots = [snapshot()]
    real_step = trainer.train_step

    def step_and_snapshot(micro):
        record = real_step(micro)
        snapshots.append(snapshot())
        return record

    trainer.train_step = step_and_snapshot
    trainer.train()
    exp.train.max_steps = 3
    resumed = Trainer(exp, f"{out}/run")  # loads the sharded average from the whole tensors of the checkpoint
    reloaded = resumed.ema.state_dict()
    if rank == 0:
        torch.save({"snapshots": snapshots, "reloaded": reloaded, "updates": resumed.ema.updates},
                   f"{out}/ema.pt")
    torch.distributed.destroy_process_group()


def test_fsdp_keeps_a_sharded_weight_average_and_evaluates_it(tmp_path):
    from vlp.eval.cli import main as eval_main
    from vlp.train import checkpoint

    shards = tmp_path / "shards"
    make_shard_set(shards, [4 * BATCH])
    context = mp.spawn(_fsdp_ema_rank, args=(2, free_port(), str(shards), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):  # a collective that only some ranks enter would hang: fail instead
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("two FSDP ranks with an EMA and evaluation did not finish in 300 s")
    result = torch.load(tmp_path / "ema.pt", weights_only=True)
    snapshots = result["snapshots"]
    expected = {k: v.clone() for k, v in snapshots[0].items() if v.is_floating_point()}
    for n, weights in enumerate(snapshots[1:], start=1):  # the recurrence by hand on the whole weights
        decay = min(0.5, (1 + n) / (10 + n))
        for k in expected:
            expected[k] = decay * expected[k] + (1 - decay) * weights[k]
    path = checkpoint.latest(tmp_path / "run")
    average, online = checkpoint.load(path)[0], checkpoint.load_online(path)
    for k in expected:
        assert torch.allclose(average[k], expected[k], atol=1e-6), k
        assert torch.equal(result["reloaded"][k], average[k]), k
    assert all(torch.equal(online[k], snapshots[-1][k]) for k in online)
    assert sum(not torch.allclose(average[k], online[k], atol=1e-4) for k in expected) > len(expected) // 2
    assert result["updates"] == 2
    # the evaluation during training saw the average: evaluating the saved average gives the same accuracy
    during = json.loads((tmp_path / "run" / "eval" / "step-0000002" / "digits__zeroshot_classification.json")
                        .read_text())["metrics"]
    assert eval_main(["--model", f"vlp-tiny-32:{path / 'model.safetensors'}", "--suite", "digits", "--no-cache",
                      "--workers", "0", "--out", str(tmp_path / "after")]) == 0
    after = json.loads((tmp_path / "after" / "digits__zeroshot_classification.json").read_text())["metrics"]
    assert during == after
