"""Run logging: a console line per interval (samples/s, ETA), ``log.jsonl``, tensorboard, a loss plot.

A run that starts at step k (resumed from its checkpoint of step k, or 0 for a fresh start) drops what the log
holds of later steps, which it is about to replay: a reader of ``log.jsonl`` or tensorboard sees each step once.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from vlp import atomic


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int | None, start_step: int = 0):
        self.run_dir, self.enabled, self.total_steps = Path(run_dir), enabled, total_steps
        self.last_time, self.last_step, self.samples = time.time(), start_step, 0
        self.losses: list[float] = []  # of the steps since the last line
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            forget_after(self.run_dir / "log.jsonl", start_step)
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1)

    def count(self, samples: int, loss: float | None = None) -> None:
        self.samples += samples
        if loss is not None:
            self.losses.append(loss)

    def log(self, step: int, record: dict) -> None:
        if "eval" in record:  # evaluation time is not training throughput
            self._write(step, record)
            return
        now = time.time()
        rate = self.samples / max(now - self.last_time, 1e-9)
        steps_per_s = (step - self.last_step) / max(now - self.last_time, 1e-9)
        eta = (self.total_steps - step) / steps_per_s if self.total_steps and steps_per_s > 0 else None
        if self.losses:  # "loss" stays the loss of this step; the mean over the interval is far less noisy
            record = {**record, "loss_mean": sum(self.losses) / len(self.losses)}
        self.last_time, self.last_step, self.samples, self.losses = now, step, 0, []
        record = {"step": step, **record, "samples_per_s": round(rate, 1), "eta_s": eta and round(eta)}
        self._write(step, record)

    def _write(self, step: int, record: dict) -> None:
        record = {**record, "step": step, "time": round(time.time(), 2)}
        if not self.enabled:
            return
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("step", "time", "eta_s"):
                self.tb.add_scalar(k, v, step)
            elif isinstance(v, dict):
                for kk, vv in v.items():
                    if isinstance(vv, (int, float)):
                        self.tb.add_scalar(f"{k}/{kk}", vv, step)
        if "eval" in record:
            figures = ", ".join(f"{k} {v:.4f}" for k, v in record["eval"].items() if isinstance(v, float))
            print(f"step {step} eval: {figures}", flush=True)
            return
        total = f"/{self.total_steps}" if self.total_steps else ""
        eta = record.get("eta_s")
        eta_s = f" eta {_duration(eta)}" if eta is not None else ""
        skipped = f" skipped {record['skipped']}" if record.get("skipped") else ""
        loss = record.get("loss_mean", record.get("loss", float("nan")))
        print(f"step {step}{total} epoch {record.get('epoch')} loss {loss:.4f} "
              f"lr {record.get('lr', 0):.2e} {record['samples_per_s']:,.0f} samples/s{eta_s}{skipped}", flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def forget_after(path: Path, step: int) -> None:
    """Keep the lines of ``path`` (``log.jsonl``) up to ``step``, and none cut short by a killed process."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    atomic.write_text(path, "".join(line + "\n" for line in kept))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def plot_loss(run_dir: Path) -> Path | None:
    """``plots/loss.png`` from ``log.jsonl``."""
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r.get("loss_mean", r["loss"]) for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over each log interval)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    out = Path(run_dir) / "plots" / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
