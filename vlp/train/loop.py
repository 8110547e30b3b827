"""The training loop. Builders set everything up; ``Trainer.train`` reads top to bottom.

Semantics worth knowing:
- the contrastive batch of one step spans every rank and every accumulation micro-batch: features of the
  other micro-batches are computed once without gradients and the loss of micro-batch j is taken against all of
  them (the trick of open_clip's ``accum_freq``), so K micro-batches of B train exactly as one batch of K*B;
- ranks leave an epoch together (a one-number all-reduce per step, on the host: a gloo group beside NCCL), so
  none ever waits on a rank without data;
- every model output an objective reads is merged over the micro-batches by the rule the model gives for it
  (``VLPModel.merge_rules``: rows are concatenated, shared values such as the logit scale count once); an output
  without a rule is an error naming the objective when the trainer is built;
- a step whose loss is not finite stops the run and no weight takes its update (the last checkpoint stays good);
- SIGTERM finishes the current step, writes a checkpoint and exits with status 0; every rank stops at the same step.
  A process that cannot get there (waiting in a collective on a rank that is gone, a loader that blocks) exits
  anyway ``train.stop_grace`` seconds after the signal, with status 143 and without a checkpoint; a second SIGTERM
  exits at once;
- the host reads from the device once per step, before the optimizer moves (loss, finiteness, the SIGTERM flag,
  metrics: ``_pack``).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from vlp import atomic
from vlp.config import DataConfig, Experiment, label_prompts, to_yaml, validate
from vlp.data import Loader, ShardStream, Source, StreamOptions
from vlp.data.preprocess import ImageOptions, Normalize
from vlp.data.shards import check_complete
from vlp.models import VLPModel, build_model
from vlp.models.parts import SHARED
from vlp.models.text import PackingPlan
from vlp.objectives import build_objective
from vlp.train import checkpoint
from vlp.train.distributed import DistInfo, all_have_data, barrier, setup
from vlp.train.ema import WeightEMA
from vlp.train.logger import RunLogger, plot_loss
from vlp.train.optim import build_optimizer, freeze_parameters, lr_factor, set_lr

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class StepValues:
    """One step's values from the device (``Trainer._pack``), with what the host knew when it queued the step."""
    step: int  # the step's number as logged (1 for the first)
    epoch: int
    lr: float
    samples: int  # over all ranks
    values: torch.Tensor  # loss, sum of the micro-batch losses, stop flag, one-element metrics
    names: list[str]  # the metrics' names, in ``values[3:]``
    extra: dict  # metrics that are plain numbers already


def build_loader(cfg: DataConfig, model: torch.nn.Module, tokenizer, dist: DistInfo, seed: int) -> Loader:
    pp = open_clip.get_model_preprocess_cfg(model)
    image = ImageOptions(size=pp["size"][0], train=True, scale=cfg.scale, ratio=tuple(cfg.ratio), draft=cfg.draft,
                         hflip=cfg.hflip, mean=pp["mean"], std=pp["std"])
    opts = StreamOptions(batch_size=cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer, seed=seed,
                         resampled=cfg.resampled, samples_per_epoch=cfg.samples_per_epoch,
                         drop_last=cfg.drop_last or dist.distributed, caption=cfg.caption,
                         captions_per_sample=cfg.captions_per_sample, image=image, color_jitter=cfg.color_jitter,
                         token_drop=cfg.token_drop, cutout=cfg.cutout, normalize=dist.device.type == "cpu",
                         attributes=cfg.attributes or None,
                         identity_batches=tuple(cfg.identity_batches) if cfg.identity_batches else None)
    if not cfg.train:
        raise ValueError("data.train: no training source given")
    for i, source in enumerate(cfg.train):  # a set whose writer stopped: its last samples are missing
        reason = check_complete(source.shards)
        if reason:
            log.warning("data.train[%d].shards: an incomplete shard set: %s", i, reason)
    sources = [Source(s.shards, s.weight, prompts=label_prompts(s.prompts, f"data.train[{i}].prompts")
                      if s.prompts else None) for i, s in enumerate(cfg.train)]
    if cfg.in_memory:
        if cfg.resampled:
            raise ValueError("data.in_memory reads its sources in epochs: not with data.resampled")
        from vlp.data.memory import MemoryLoader

        return MemoryLoader(sources, opts, tokenizer, dist.rank, dist.world_size, size_schedule=cfg.size_schedule)
    if cfg.size_schedule:
        raise ValueError("data.size_schedule needs data.in_memory: true")
    stream = ShardStream(sources, opts, tokenizer, rank=dist.rank, world_size=dist.world_size)
    return Loader(stream, workers=cfg.workers, pin_memory=dist.device.type == "cuda")


def merge_batches(batches: list[dict]) -> dict:
    """The micro-batches' fields as one batch (tensors concatenated)."""
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def merge_outputs(outputs: list[dict], j: int, keys: set[str], rules: dict[str, str]) -> dict:
    """Micro-batch ``j``'s outputs (with gradients) among the others' (computed without): per-sample rows
    concatenated in micro-batch order, shared values (the logit scale) taken from ``j`` and detached unless ``j``
    is the last, so that their gradient is counted once per step."""
    merged = {}
    for key in keys:
        if key not in outputs[j]:  # (a SigLIP objective on a model without a logit bias says so itself)
            continue
        if rules[key] == SHARED:
            merged[key] = outputs[j][key] if j == len(outputs) - 1 else outputs[j][key].detach()
        else:
            merged[key] = torch.cat([o[key] for o in outputs])
    return merged


def to_device(inputs: dict, device: torch.device) -> dict:
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, (torch.Tensor, PackingPlan)):
            value = value.to(device, non_blocking=True)
        moved[key] = value
    return moved


class EmptyEpoch(RuntimeError):
    pass


class Trainer:
    def __init__(self, exp: Experiment, run_dir: str | Path | None = None):
        validate(exp)  # as when a config file loads: an Experiment built in code gets the same checks
        self.exp = exp
        self.dist = setup(exp.train.device)
        self.device = self.dist.device
        if exp.train.threads and self.device.type == "cpu":
            torch.set_num_threads(exp.train.threads)
        if self.device.type == "cuda":  # as open_clip_train: fp32 matmuls in TF32, cuDNN picks its fastest kernels
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.run_dir = Path(run_dir) if run_dir else Path(exp.out) / exp.name
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.run_dir / "config.yaml", to_yaml(exp))
        self._seed(exp.train.seed)

        model = build_model(exp.model, self.device, pack_text=False if exp.train.fsdp else None)
        freeze_parameters(model, exp.optim)
        self.raw_model: VLPModel = model
        self.replicated: set[torch.nn.Parameter] = set()  # parameters outside FSDP's sharding
        self.model = self._wrap(model)
        self.optimizer = build_optimizer(model, exp.optim)
        self.ema = self._build_ema(model)
        self.objectives = [(o.weight, o.name, build_objective(o.name, o.options, key=f"objectives[{i}]",
                                                              rank=self.dist.rank, world_size=self.dist.world_size,
                                                              local_loss=exp.train.local_loss))
                           for i, o in enumerate(exp.objectives)]
        self.fields = tuple(dict.fromkeys(f for _, _, o in self.objectives for f in o.fields))
        self.reads = self._check_reads()
        self.loader = build_loader(exp.data, model.clip, open_clip.get_tokenizer(exp.model.name), self.dist,
                                   exp.train.seed)
        self.lookahead = getattr(self.loader, "lookahead", False)  # the stream's setting (see _plan_lookahead)
        # On an accelerator the loaders hand over uint8 images (a quarter of the bytes to copy and pin), normalised
        # here after the copy; on the CPU they arrive normalised.
        pp = open_clip.get_model_preprocess_cfg(model.clip)
        self.normalize = Normalize(pp["mean"], pp["std"], self.device)
        per_epoch = self.loader.batches_per_epoch()
        self.steps_per_epoch = per_epoch // exp.train.accum_steps if per_epoch is not None else None
        if exp.train.max_steps is None and not self.steps_per_epoch:
            raise ValueError("train.max_steps is needed: the epoch length is unknown or shorter than one step")
        self.total_steps = exp.train.max_steps or exp.train.epochs * self.steps_per_epoch
        if exp.train.max_steps and self.steps_per_epoch:
            self.total_steps = min(self.total_steps, exp.train.epochs * self.steps_per_epoch)
        self.autocast = self._autocast(exp.train.precision)
        self.scaler = torch.amp.GradScaler(enabled=exp.train.precision == "fp16" and self.device.type == "cuda")
        self.step, self.epoch = 0, 0
        self._sigterm = False  # this process got SIGTERM
        self._stop = False  # the ranks agree to stop (from the read-back, so all of them at the same step)
        self._watchdog: threading.Timer | None = None  # ends the process if a SIGTERM cannot be honoured in time
        self._saved_step: int | None = None
        self.last_record: dict = {}
        self._resume()
        self.logger = RunLogger(self.run_dir, self.dist.is_main, self.total_steps, self.step)

    # -- the loop ----------------------------------------------------------------------------------------------
    def train(self) -> dict:
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        if self.dist.is_main:
            print(f"training {self.exp.name} from step {self.step} to {self.total_steps} in {self.run_dir}", flush=True)
        try:
            while not self._finished():
                self.loader.set_epoch(self.epoch)
                self._plan_lookahead()
                if self._run_epoch():
                    self.epoch += 1
            if self._saved_step != self.step:  # not already written by a due checkpoint or the stop
                self.save()
            if self._stop:
                print(f"SIGTERM: checkpoint at step {self.step} written, exiting", flush=True)
                return self.last_record
            if self.exp.eval.suite and not self._due(self.exp.eval.every):
                self.evaluate()
            if self.dist.is_main:
                plot_loss(self.run_dir)
            return self.last_record
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            signal.signal(signal.SIGTERM, previous)
            self.loader.close()
            self.logger.close()

    def _run_epoch(self) -> bool:
        """Steps until the epoch's data runs out (True) or the run is finished or stopped (False)."""
        fresh, first_step = self.loader.at_epoch_start(), self.step
        batches = iter(self.loader)
        while not self._finished():
            micro = list(itertools.islice(batches, self.exp.train.accum_steps))
            if not all_have_data(len(micro) == self.exp.train.accum_steps, self.dist):
                batches.close()
                if fresh and self.step == first_step:  # else the next epoch would be empty too, forever
                    raise EmptyEpoch(f"epoch {self.epoch} gave no batch of {self.exp.train.accum_steps} x "
                                     f"{self.exp.data.batch_size} samples: {self.loader.describe()}")
                return True
            self.train_step(micro)
            self.step += 1
            if self._due(self.exp.train.checkpoint_every) or self._stop:
                self.save()
            if self._due(self.exp.eval.every):
                self.evaluate()
        return False

    def _plan_lookahead(self) -> None:
        """The streaming loader starts the next epoch's workers before this one ends: only worth it when the run
        goes on past this epoch. Otherwise they would fork and fill shuffle buffers for nothing, taking the cores
        the last batches need (on a 16-core GPU host, a 6 s stall at the end of a one-epoch ViT-B/32 run)."""
        if self.lookahead and self.steps_per_epoch:
            self.loader.lookahead = self.total_steps > (self.epoch + 1) * self.steps_per_epoch

    def _finished(self) -> bool:
        return self.step >= self.total_steps or self._stop

    def train_step(self, micro: list[dict]) -> None:
        """One optimizer step over the micro-batches; its values go to ``last_record`` and the log."""
        self.model.train()
        lr = set_lr(self.optimizer, self.exp.optim.lr, lr_factor(self.step, self.total_steps, self.exp.schedule))
        inputs = [self._inputs(b) for b in micro]
        batches = [to_device({f: b[f] for f in self.fields}, self.device) for b in micro]
        if len(micro) == 1:
            with self.autocast:
                loss, metrics = self._loss(self.model(inputs[0]), batches[0])
            self.scaler.scale(loss).backward()
            losses = [loss.detach()]
        else:
            with torch.no_grad(), self.autocast:
                outputs = [self.model(x) for x in inputs]
            batch = merge_batches(batches)
            losses = []
            for j, x in enumerate(inputs):
                with self._no_sync(j < len(inputs) - 1), self.autocast:
                    outputs[j] = self.model(x)
                    loss, metrics = self._loss(merge_outputs(outputs, j, self.reads, self.raw_model.merge_rules),
                                               batch)
                self.scaler.scale(loss).backward()  # each backward adds the gradient through micro-batch j
                outputs[j] = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in outputs[j].items()}
                losses.append(loss.detach())
        values, names = self._pack(losses, metrics)
        self._record(StepValues(self.step + 1, self.epoch, lr, sum(len(b["uid"]) for b in micro) * self.dist.world_size,
                                values, names, {k: float(v) for k, v in metrics.items() if k not in names}))
        self._sync_replicated_grads()
        if self.exp.optim.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.exp.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.raw_model.clip.logit_scale.clamp_(0, math.log(self.exp.model.logit_scale_max))
        if self.ema is not None:
            self.ema.update(self.raw_model)

    # -- pieces --------------------------------------------------------------------------------------------
    def _check_reads(self) -> set[str]:
        """The model outputs the objectives read; with accumulation each needs a merge rule of the model."""
        reads = {key for _, _, o in self.objectives for key in o.reads}
        if self.exp.train.accum_steps > 1:
            for i, (_, name, objective) in enumerate(self.objectives):
                unknown = [k for k in objective.reads if k not in self.raw_model.merge_rules]
                if unknown:
                    raise ValueError(f"objectives[{i}] ({name}) reads {unknown[0]!r}, which the model does not say "
                                     "how to merge over micro-batches: set train.accum_steps: 1, or declare the "
                                     "output in its part's outputs")
        return reads

    def _inputs(self, batch: dict) -> dict:
        inputs = to_device(self.raw_model.prepare(batch), self.device)
        images = inputs["image"]
        if images.dtype == torch.uint8:
            images = self.normalize(images)
        if self.exp.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        inputs["image"] = images
        return inputs

    def _loss(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        total, metrics = 0.0, {}
        for weight, name, objective in self.objectives:
            loss, extra = objective(out, batch)
            total = total + weight * loss
            metrics[f"loss_{name}"] = loss.detach()
            metrics.update(extra)
        return total, metrics

    def _pack(self, losses: list[torch.Tensor], metrics: dict) -> tuple[torch.Tensor, list[str]]:
        """The step's values as one tensor on the device, queued after the backward passes: the loss, the sum of
        every micro-batch's loss (not finite if one is not), this process's SIGTERM flag and the one-element
        metrics; averaged over the ranks in one all-reduce, so every rank reads the same values."""
        names = [k for k, v in metrics.items() if isinstance(v, torch.Tensor) and v.numel() == 1]
        device = losses[-1].device
        flag = torch.full((), float(self._sigterm), device=device)  # a fill, not a host-to-device copy
        packed = torch.stack([losses[-1].float(), torch.stack(losses).float().sum(), flag,
                              *(metrics[k].detach().float().reshape(()) for k in names)])
        if self.dist.distributed:
            torch.distributed.all_reduce(packed)
            packed /= self.dist.world_size
        return packed, names

    def _record(self, pending: StepValues) -> None:
        """Reads a step's values (the one wait on the device): the agreed stop flag, ``last_record``, the log line.
        Raises :class:`TrainingDiverged` if a loss of the step was not finite."""
        values = pending.values.tolist()
        loss, total, stop = values[:3]
        self._stop = self._stop or stop > 0
        if not (math.isfinite(loss) and math.isfinite(total)):
            last = checkpoint.latest(self.run_dir)
            raise TrainingDiverged(f"loss became {loss if not math.isfinite(loss) else total} at step "
                                   f"{pending.step} (epoch {pending.epoch}); the optimizer did not step. "
                                   f"Last good checkpoint: {last or 'none'}")
        self.last_record = {"loss": loss, "lr": pending.lr, **pending.extra, **dict(zip(pending.names, values[3:]))}
        self.logger.count(pending.samples, loss)
        if pending.step % self.exp.train.log_every == 0 or pending.step == self.total_steps:
            self.logger.log(pending.step, {"epoch": pending.epoch, **self.last_record,
                                           "skipped": dict(self.loader.skipped)})

    def _sync_replicated_grads(self) -> None:
        for p in self.replicated:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.dist.world_size

    def _due(self, every: int | None) -> bool:
        return bool(every) and self.step % every == 0

    def _no_sync(self, skip: bool):
        if skip and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _autocast(self, precision: str):
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)

    def _wrap(self, model: VLPModel) -> torch.nn.Module:
        part, clip = self.exp.model.compile, model.clip
        if part in ("visual", "text"):  # in place: parameter names (and so checkpoints) stay plain
            text = clip.text if hasattr(clip, "text") else clip.transformer  # CustomTextCLIP or CLIP
            (clip.visual if part == "visual" else text).compile()
        if self.exp.train.fsdp:
            if self.exp.model.channels_last:  # FSDP2 shards only contiguous parameters (torch 2.14)
                raise ValueError("model.channels_last cannot be combined with train.fsdp: FSDP does not shard "
                                 "channels-last parameters")
            if not self.dist.distributed:
                raise ValueError("train.fsdp needs several processes (torchrun --nproc_per_node N)")
            from torch.distributed.fsdp import fully_shard

            # each transformer block is a unit; other towers (timm CNNs) go with the root unit
            for tower in (getattr(clip.visual, "transformer", None), getattr(clip, "transformer", None)):
                for block in getattr(tower, "resblocks", []):
                    fully_shard(block)
            # FSDP2 cannot shard 0-d parameters (logit scale and bias): they stay replicated and their
            # gradients are averaged by hand (_sync_replicated_grads).
            self.replicated = {p for p in model.parameters() if p.dim() == 0}
            fully_shard(model, ignored_params=self.replicated)
        elif self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.exp.model.compile is True:
            model = torch.compile(model)
        return model

    def _build_ema(self, model: torch.nn.Module) -> WeightEMA | None:
        if self.exp.train.ema is None:
            return None
        return WeightEMA(model, self.exp.train.ema)  # under FSDP, sharded like the weights

    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _on_sigterm(self, signum, frame) -> None:
        if self._sigterm:  # asked twice: no more waiting
            self._exit_unclean("a second SIGTERM")
        self._sigterm = True  # the ranks agree on it through the next read-back
        self._arm_watchdog("after SIGTERM")

    def _arm_watchdog(self, since: str) -> None:
        """(Re)start the countdown to an unclean exit: ``train.stop_grace`` seconds from now."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        grace = self.exp.train.stop_grace
        self._watchdog = threading.Timer(grace, self._exit_unclean, (f"not stopped cleanly {grace:g} s {since}",))
        self._watchdog.daemon = True
        self._watchdog.start()

    def _exit_unclean(self, why: str) -> None:
        last = checkpoint.latest(self.run_dir)
        print(f"SIGTERM: {why} (waiting on another rank or on data?): exiting without a checkpoint; the last one "
              f"is {last or 'none'}", file=sys.stderr, flush=True)
        os._exit(143)

    # -- checkpoints and evaluation ------------------------------------------------------------------------
    def save(self) -> None:
        if self._watchdog is not None:  # stopping, and this rank got this far: the write gets a grace of its own
            self._arm_watchdog("into writing the checkpoint")
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.raw_model, options=options)
        optim_state = get_optimizer_state_dict(self.raw_model, self.optimizer, options=options)
        ema_state = self.ema.state_dict() if self.ema is not None else None  # every rank: FSDP gathers
        data_states = [self.loader.state_dict()]
        if self.dist.distributed:
            data_states = [None] * self.dist.world_size
            torch.distributed.all_gather_object(data_states, self.loader.state_dict())
        if self.dist.is_main:
            state = {"step": self.step, "epoch": self.epoch, "optimizer": optim_state,
                     "scaler": self.scaler.state_dict(), "rng": checkpoint.rng_state(),
                     "data": json.dumps(data_states), "world_size": self.dist.world_size}
            online = None
            if self.ema is not None:  # model.safetensors holds the average; the optimizer's weights go beside it
                model_state, online = ema_state, model_state
                state["ema_updates"] = self.ema.updates
            checkpoint.save(self.run_dir, self.step, model_state, state, to_yaml(self.exp),
                            self.exp.train.keep_checkpoints, online_state=online)
        self._saved_step = self.step
        barrier(self.dist)

    def _resume(self) -> None:
        mode = self.exp.train.resume
        if mode == "never":
            return
        path = checkpoint.latest(self.run_dir) if mode == "auto" else Path(mode)
        if path is None:
            return
        model_state, state = checkpoint.load(path)
        online = checkpoint.load_online(path)
        if (online is None) != (self.ema is None):
            raise ValueError(f"{path}: a checkpoint {'without' if online is None else 'with'} an EMA of the weights "
                             f"cannot resume a run with train.ema: {self.exp.train.ema}")
        if self.ema is not None:
            self.ema.load_state_dict(model_state, int(state["ema_updates"]))
            model_state = online
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        try:
            set_model_state_dict(self.raw_model, model_state, options=options)
            set_optimizer_state_dict(self.raw_model, self.optimizer, state["optimizer"], options=options)
        except (RuntimeError, KeyError) as e:
            raise checkpoint.CheckpointError(
                f"{path}: does not fit this run's model and optimizer ({str(e).strip().splitlines()[0]}); a "
                "checkpoint of another model, or of a vlp before model parts (parameters named visual.* instead of "
                "clip.visual.*), cannot resume this run: start it anew (train.resume: never), with "
                f"model.pretrained: {path / checkpoint.MODEL} to keep its weights") from None
        self.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        data_states = json.loads(state["data"])
        if len(data_states) == self.dist.world_size:
            self.loader.load_state_dict(data_states[self.dist.rank])
        else:  # another world size: the data position cannot carry over, restart the epoch
            log.warning("resuming with %d ranks from a checkpoint of %d: the epoch restarts",
                        self.dist.world_size, len(data_states))
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step} (epoch {self.epoch})", flush=True)

    def evaluate(self) -> dict | None:
        """The suite on the main rank, on the EMA of the weights if there is one. Under FSDP every rank first
        takes part in gathering the whole weights, and the main rank evaluates an unsharded copy (a sharded
        model's forward would wait for the other ranks)."""
        if not self.exp.eval.suite:
            return None
        gathered = None
        if self.exp.train.fsdp:
            gathered = self.ema.state_dict() if self.ema is not None else get_model_state_dict(
                self.raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.dist.is_main:
            barrier(self.dist)
            return None
        from vlp.eval.suite import run_suite_for_training

        model, average = self.raw_model, self.ema
        if gathered is not None:  # the average, if any, is already in these weights
            model = build_model(self.exp.model, self.device, pretrained=False, training=False)
            model.load_state_dict(gathered)
            average = None
        model.eval()
        with average.applied(model) if average is not None else contextlib.nullcontext():
            results = run_suite_for_training(model, self.exp.model.name, self.exp.eval.suite,
                                             self.run_dir / "eval" / f"step-{self.step:07d}",
                                             batch_size=self.exp.eval.batch_size, device=self.device)
        self.logger.log(self.step, {"epoch": self.epoch, "eval": results})
        barrier(self.dist)
        return results


def train(exp: Experiment, run_dir: str | Path | None = None) -> dict:
    start = time.time()
    trainer = Trainer(exp, run_dir)
    record = trainer.train()
    record["seconds"] = round(time.time() - start, 1)
    if trainer._stop:  # SIGTERM: checkpointed before the last step; a caller with more stages must not go on
        record["stopped"] = True
    return record
