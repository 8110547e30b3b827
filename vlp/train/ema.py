"""An exponential moving average of the model's weights (``train.ema``: the decay per step).

The average covers every floating entry of the model's state dict (parameters and BatchNorm's running
statistics); integer buffers (``num_batches_tracked``) are copied. As in timm's ``ModelEmaV3``, the decay warms up
as ``min(decay, (1 + n) / (10 + n))`` after n updates, so that the random initialisation is forgotten quickly.

Checkpoints of a run with an EMA hold the average in ``model.safetensors`` (the model to evaluate and publish)
and the weights the optimizer moves in ``online.safetensors`` (what a resumed run continues from). Evaluation
during training evaluates the average.

Under FSDP the average is sharded like the weights (each rank averages its own shards, no communication per
step); ``state_dict`` then gathers whole tensors and must be called on every rank.
"""
from __future__ import annotations

import contextlib

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class WeightEMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema: {decay} is not a decay in (0, 1) (e.g. 0.995), or null for none")
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._floats = [k for k, v in self.shadow.items() if v.is_floating_point()]
        self._others = [k for k, v in self.shadow.items() if not v.is_floating_point()]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        weight = 1.0 - self.current_decay()
        state = model.state_dict()
        torch._foreach_lerp_([_local(self.shadow[k]) for k in self._floats],
                             [_local(state[k].detach()) for k in self._floats], weight)
        for k in self._others:
            _local(self.shadow[k]).copy_(_local(state[k]))

    def state_dict(self) -> dict:
        """The average as whole tensors. Under FSDP they are gathered from every rank's shards, one at a time, into
        CPU memory: call it on every rank."""
        return {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict, updates: int) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"the checkpoint's EMA weights lack {sorted(missing)[:3]}")
        with torch.no_grad():
            for k, v in self.shadow.items():
                if isinstance(v, DTensor):  # every rank holds the whole tensor: each keeps its own shard
                    whole = state[k].to(device=v.device, dtype=v.dtype)
                    v.copy_(distribute_tensor(whole, v.device_mesh, v.placements, src_data_rank=None))
                else:
                    v.copy_(state[k])
        self.updates = updates

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """The model holds the averaged weights inside the block, its own weights again after it."""
        online = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(online)
