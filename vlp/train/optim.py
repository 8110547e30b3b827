"""Optimizer and schedule builders: AdamW with parameter-group rules from the config, warmup, then a decay."""
from __future__ import annotations

import math
import re

import torch

from vlp.config import OptimConfig, ScheduleConfig
from vlp.models.model import CLIP_PREFIX


def rule_name(name: str) -> str:
    """The name rules match: open_clip's own for the open_clip model (``visual.conv1.weight``, as in
    ``model.safetensors``), ``parts.<part>.…`` for the extra parts."""
    return name.removeprefix(CLIP_PREFIX)


def _resolve(name: str, param: torch.Tensor, cfg: OptimConfig) -> tuple[float, float, bool]:
    """(lr scale, weight decay, frozen) of a parameter: rules apply in order, later ones override earlier ones."""
    name = rule_name(name)
    lr_scale, wd, frozen = 1.0, cfg.weight_decay, False
    for rule in cfg.rules:
        if re.fullmatch(rule.pattern, name) and (rule.max_dims is None or param.dim() <= rule.max_dims):
            lr_scale = rule.lr_scale if rule.lr_scale is not None else lr_scale
            wd = rule.weight_decay if rule.weight_decay is not None else wd
            frozen = rule.freeze or frozen
    return lr_scale, wd, frozen


def freeze_parameters(model: torch.nn.Module, cfg: OptimConfig) -> None:
    """Apply the ``freeze`` rules (e.g. ``{pattern: "visual\\..*", freeze: true}``: LiT). Call it before wrapping
    the model in DDP/FSDP, which must know which parameters get gradients."""
    for name, param in model.named_parameters():
        if _resolve(name, param, cfg)[2]:
            param.requires_grad_(False)


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """One group per distinct (lr_scale, weight_decay) over the parameters that train."""
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        lr_scale, wd, frozen = _resolve(name, param, cfg)
        if frozen or not param.requires_grad:
            continue
        group = groups.setdefault((lr_scale, wd), {"params": [], "lr_scale": lr_scale, "weight_decay": wd})
        group["params"].append(param)
    if not groups:
        raise ValueError("optim.rules freeze every parameter: nothing left to train")
    return list(groups.values())


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``. Build it after FSDP wrapping, which replaces the parameters."""
    groups = param_groups(model, cfg)
    fused = cfg.fused and all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda")
                              for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warmup, then constant, or a cosine or
    linear decay to ``min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    if cfg.name not in ("cosine", "linear"):  # the config refuses it when it loads; this for configs built in code
        raise ValueError(f"schedule.name: unknown schedule {cfg.name!r} (cosine, linear, constant)")
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    left = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.name == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * left


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor * group.get("lr_scale", 1.0)
    return base_lr * factor
