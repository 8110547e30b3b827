"""Optimizer and schedule builders: AdamW with parameter-group rules from the config, warmup + cosine."""
from __future__ import annotations

import math
import re

import torch

from vlp.config import OptimConfig, ScheduleConfig


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """One group per distinct (lr_scale, weight_decay); frozen parameters get requires_grad=False.

    Rules apply in order and later ones override earlier ones, e.g. ``{pattern: "visual\\..*", freeze: true}``
    after the defaults freezes the image tower (LiT)."""
    rules = [(re.compile(r.pattern), r) for r in cfg.rules]
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        lr_scale, wd, frozen = 1.0, cfg.weight_decay, False
        for pattern, rule in rules:
            if pattern.fullmatch(name):
                lr_scale = rule.lr_scale if rule.lr_scale is not None else lr_scale
                wd = rule.weight_decay if rule.weight_decay is not None else wd
                frozen = rule.freeze or frozen
        if frozen:
            param.requires_grad_(False)
            continue
        group = groups.setdefault((lr_scale, wd), {"params": [], "names": [], "lr_scale": lr_scale,
                                                   "weight_decay": wd})
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise ValueError("optim.rules freeze every parameter: nothing left to train")
    return list(groups.values())


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    for g in groups:
        g.pop("names")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warmup, then cosine or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    if cfg.name != "cosine":
        raise ValueError(f"schedule.name: unknown schedule {cfg.name!r} (cosine, constant)")
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor * group.get("lr_scale", 1.0)
    return base_lr * factor
