"""Training throughput: vlp's trainer against ``open_clip_train.main``, tiny model, same machine, same invocation.

    .venv/bin/python benchmarks/train_speed.py                   # 80 steps per run, 2 rounds
    .venv/bin/python benchmarks/train_speed.py --steps 24 --skip 4 --rounds 2

Each round trains ``vlp-tiny-32`` once with each tool (the order alternates between rounds, so drift on a shared
machine falls on both), each in a fresh subprocess: Flickr8k train shards (one sample per caption), batch 256,
lr 1e-3, wd 0.1, fp32, 2 loader workers, no evaluation. This script polls each tool's log every 0.1 s (vlp's
``log.jsonl``, open_clip_train's ``out.log``, one line per step) and marks the end of step ``skip`` and of the last
step: samples/s = 256 x (steps - skip) / the wall time between the marks, so process start-up, model building, the
first batches (worker start-up, shuffle buffer) and the final checkpoint are excluded, and both tools are timed by
the same clock. CPU ms/sample: user + system CPU of the training process and its loader workers between the same
marks (/proc), which other load on a shared machine inflates much less than wall time.
The report gives each run and the median over runs of each tool; ``--out``/train_speed.{json,md}.

``--baseline DIR`` adds a third tool, ``vlp-baseline``: the vlp of another checkout (e.g.
``git worktree add /tmp/base <rev>``), run from this one with ``PYTHONPATH=DIR``, so that a change to the trainer
is timed against the code before it in the same rounds; ``--tools`` picks which tools run
(``--tools vlp,vlp-baseline`` leaves open_clip_train out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_compare import BATCH, MODEL, PY, REPO, WDS, WORKERS, ensure_shards, ensure_wds, log, shard_spec  # noqa: E402

GOAL = 1.1
CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live descendants (loader workers), reaped children included."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15]) / CLK_TCK  # utime stime cutime cstime
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def measure(cmd: list[str], env: dict, log_file: Path, steps_done, steps: int, skip: int, out: Path) -> dict:
    """Runs a training and polls its log: wall time and CPU time between the end of step ``skip`` and the end of
    the last step, read the same way for both tools."""
    log(" ".join(cmd))
    start = time.time()
    marks = {}
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env})
        while proc.poll() is None:
            done = steps_done(log_file) if log_file.exists() else 0
            for mark in (skip, steps):
                if done >= mark and mark not in marks:
                    marks[mark] = (time.time(), tree_cpu_seconds(proc.pid), done)
            time.sleep(0.1)
    if proc.returncode != 0 or len(marks) < 2:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {out}")
    (t0, c0, _), (t1, c1, n1) = marks[skip], marks[steps]
    samples = BATCH * (steps - skip)
    return {"samples_per_s": samples / (t1 - t0), "cpu_ms_per_sample": 1000 * (c1 - c0) / samples,
            "steps": n1, "process_s": round(time.time() - start, 1)}


def openclip_steps(log_file: Path) -> int:
    return log_file.read_text().count("Train Epoch:")  # one line per step (--log-every-n-steps 1)


def vlp_steps(log_file: Path) -> int:
    return sum('"loss"' in line for line in log_file.read_text().splitlines())


def run_openclip(run: Path, shards: Path, steps: int, skip: int) -> dict:
    cmd = [PY, "benchmarks/openclip_train_entry.py", "--dataset-type", "webdataset", "--train-data", shard_spec(shards),
           "--train-num-samples", str(steps * BATCH), "--batch-size", str(BATCH), "--lr", "1e-3", "--wd", "0.1",
           "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--epochs", "1", "--warmup", "10",
           "--workers", str(WORKERS), "--model", MODEL, "--precision", "fp32", "--save-frequency", "0",
           "--logs", str(run.parent), "--name", run.name, "--report-to", "", "--log-every-n-steps", "1",
           "--seed", "0", "--zeroshot-frequency", "0", "--val-frequency", "0"]
    return measure(cmd, {"PYTHONPATH": str(WDS)}, run / "out.log", openclip_steps, steps, skip,
                   run.parent / f"{run.name}.log")


def run_vlp(run: Path, shards: Path, steps: int, skip: int, tree: str | None = None) -> dict:
    cmd = [PY, "-m", "vlp", "train", "configs/flickr8k-tiny.yaml", "--run-dir", str(run),
           "--set", f"data.train=[{{shards: '{shard_spec(shards)}'}}]", "--set", f"train.max_steps={steps}",
           "--set", "train.epochs=1", "--set", "schedule.warmup_steps=10", "--set", "train.log_every=1",
           "--set", "train.checkpoint_every=null", "--set", "train.resume=never"]
    env = {"PYTHONPATH": tree} if tree else {}
    return measure(cmd, env, run / "log.jsonl", vlp_steps, steps, skip, run.parent / f"{run.name}.log")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "train_speed"))
    p.add_argument("--shards", default=str(REPO / "benchmarks" / "out" / "train_compare" / "shards"))
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--skip", type=int, default=10, help="first steps left out of the timing")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--baseline", help="another checkout's folder: its vlp is timed too, as vlp-baseline")
    p.add_argument("--tools", default=None, help="comma-separated: open_clip_train, vlp, vlp-baseline (default: all)")
    args = p.parse_args()
    if args.steps % WORKERS or args.skip >= args.steps:
        raise SystemExit(f"--steps must be a multiple of {WORKERS} and larger than --skip")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shards = ensure_shards(Path(args.shards))
    tools = {"open_clip_train": run_openclip, "vlp": run_vlp}
    if args.baseline:
        tools["vlp-baseline"] = lambda run, shards, steps, skip: run_vlp(run, shards, steps, skip, args.baseline)
    if args.tools:
        tools = {name: tools[name] for name in args.tools.split(",")}
    if "open_clip_train" in tools:
        ensure_wds()
    runs = []
    for r in range(args.rounds):
        order = list(tools) if r % 2 == 0 else list(tools)[::-1]
        for tool in order:
            run = out / f"{tool}-{r}"
            if run.exists():
                import shutil

                shutil.rmtree(run)
            result = {"tool": tool, "round": r, **tools[tool](run, shards, args.steps, args.skip)}
            log(f"{tool} round {r}: {result['samples_per_s']:.1f} samples/s")
            runs.append(result)
    medians = {t: statistics.median(x["samples_per_s"] for x in runs if x["tool"] == t) for t in tools}
    cpu = {t: statistics.median(x["cpu_ms_per_sample"] for x in runs if x["tool"] == t) for t in tools}
    reference = "open_clip_train" if "open_clip_train" in tools else "vlp-baseline"
    ratio = medians["vlp"] / medians[reference]
    summary = {"steps": args.steps, "skip": args.skip, "rounds": args.rounds, "batch": BATCH, "workers": WORKERS,
               "model": MODEL, "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs (shared)",
               "load_average_after": os.getloadavg(), "runs": runs, "median_samples_per_s": medians,
               "median_cpu_ms_per_sample": cpu, "reference": reference, "vlp_over_reference": ratio,
               "cpu_reference_over_vlp": cpu[reference] / cpu["vlp"], "goal": GOAL,
               "baseline": args.baseline}
    (out / "train_speed.json").write_text(json.dumps(summary, indent=1))
    lines = ["| tool | round | samples/s | CPU ms/sample | steps | process wall (s) |", "|---|---|---|---|---|---|"]
    lines += [f"| {x['tool']} | {x['round']} | {x['samples_per_s']:.1f} | {x['cpu_ms_per_sample']:.1f} | "
              f"{x['steps']} | {x['process_s']:.0f} |" for x in runs]
    lines += ["", "median: " + ", ".join(f"{t} {medians[t]:.1f}" for t in tools) + " samples/s; "
              f"vlp / {reference} = {ratio:.2f}x; CPU ms/sample " + ", ".join(f"{t} {cpu[t]:.1f}" for t in tools)]
    (out / "train_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
