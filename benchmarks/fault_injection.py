"""Faults a user meets, injected into vlp's own command line, and what each one cost (the claim: nothing).

    .venv/bin/python benchmarks/fault_injection.py            # about 8 minutes on 2 busy cores
    .venv/bin/python benchmarks/fault_injection.py --quick    # one fault of each kind, about 3 minutes

Every case runs ``python -m vlp ...`` in subprocesses, with fixed seeds, in a temporary folder:

1. ``kill -9`` of ``vlp train configs/digits-tiny.yaml`` (30 steps, a checkpoint every 5, 2 loader workers) at
   random times (a random step, then a random part of a step) and while a checkpoint folder is being written (a
   ``.step-*.partial`` folder seen under ``checkpoints/``), each time restarted with the same command until it
   completes. Checked against an uninterrupted run of the same command: every tensor of ``checkpoints/latest``'s
   ``model.safetensors`` bitwise, ``log.jsonl`` holding steps 1..30 once each and in order with the reference's
   losses, and no process of the killed run alive a few seconds after the kill.
2. ``kill -9`` of ``vlp shards captions --workers 2`` once some shards exist: no writer process survives, no shard
   appears or changes after the kill, and re-running the command gives the shard set of a clean run (samples,
   ``uid``s, the shard files byte for byte, the manifest but for its timing).
3. Bad inputs to ``vlp shards captions``: a caption line that is not UTF-8, a missing image, a truncated JPEG.
   Exactly those are skipped, each listed in ``manifest.json`` with its file and line; every other sample is written.
4. SIGTERM to ``vlp train`` mid-run: exit status 0, a checkpoint at the step it stopped, and the resumed run ends
   with the reference's weights.

Processes of a killed command (benchmarks/processes.py) are its descendants, recorded while it runs and just before
the signal.
Writes ``fault_injection.md`` (the table) and ``fault_injection.json`` (every trial) to ``--out``.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import GONE_WITHIN_S, REPO, Command, run, tail, wait_gone  # noqa: E402

CONFIG = "configs/digits-tiny.yaml"
STEPS, CHECKPOINT_EVERY = 30, 5
TRAIN_SETTINGS = [f"train.max_steps={STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.log_every=1",
                  "eval.suite=null", "data.workers=2"]


# -- training ----------------------------------------------------------------------------------------------------
def train_args(run_dir: Path) -> list[str]:
    args = ["train", CONFIG, "--run-dir", str(run_dir)]
    for setting in TRAIN_SETTINGS:
        args += ["--set", setting]
    return args


def log_records(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            records.append({"step": None, "torn": line[:80]})
    return records


def last_step(run_dir: Path) -> int:
    steps = [r["step"] for r in log_records(run_dir) if isinstance(r.get("step"), int)]
    return steps[-1] if steps else 0


def latest_checkpoint(run_dir: Path) -> str | None:
    pointer = run_dir / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def compare_weights(run_dir: Path, reference: Path) -> dict:
    """Every tensor of the latest checkpoint's ``model.safetensors``, compared bit for bit (NaN and -0.0 included)."""
    import torch
    from safetensors.torch import load_file

    name = latest_checkpoint(run_dir)
    if name is None:
        return {"identical": False, "why": "no checkpoints/latest"}
    ours = load_file(run_dir / "checkpoints" / name / "model.safetensors")
    ref = load_file(reference / "checkpoints" / latest_checkpoint(reference) / "model.safetensors")
    if ours.keys() != ref.keys():
        return {"identical": False, "checkpoint": name,
                "why": f"tensor names differ: {sorted(ours.keys() ^ ref.keys())[:5]}"}

    def bits(t: torch.Tensor) -> bytes:
        return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()

    differ = [k for k in ref if ours[k].dtype != ref[k].dtype or ours[k].shape != ref[k].shape
              or bits(ours[k]) != bits(ref[k])]
    return {"identical": not differ, "checkpoint": name, "tensors": len(ref), "n_differing": len(differ),
            "differing": differ[:10]}


def check_log(run_dir: Path, reference: Path) -> dict:
    ours = [r for r in log_records(run_dir) if "eval" not in r]
    ref = {r["step"]: r for r in log_records(reference) if "eval" not in r}
    steps = [r.get("step") for r in ours]
    once = steps == list(range(1, STEPS + 1))
    losses_differ = [r["step"] for r in ours if r.get("step") in ref and r.get("loss") != ref[r["step"]].get("loss")]
    return {"steps_once_in_order": once, "steps": len(steps), "distinct": len(set(steps)),
            "losses_equal_reference": once and not losses_differ, "loss_differs_at": losses_differ[:10],
            **({} if once else {"step_sequence": steps})}


def finish_run(run_dir: Path, reference: Path, logs: Path, tag: str, max_restarts: int = 3) -> dict:
    """Restart the same training command until it completes; then compare with the reference."""
    restarts = []
    for i in range(max_restarts):
        rc, seconds = run(train_args(run_dir), logs / f"{tag}-restart{i}.log")
        restarts.append({"rc": rc, "seconds": seconds, "resumed_from": _resumed_from(logs / f"{tag}-restart{i}.log")})
        if rc == 0:
            break
    return {"restarts": restarts, "completed": restarts[-1]["rc"] == 0,
            "weights": compare_weights(run_dir, reference), "log": check_log(run_dir, reference)}


def _resumed_from(log: Path) -> str | None:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("resumed from "):
            return line.split()[2].rsplit("/", 1)[-1]
    return None


def kill_training(run_dir: Path, reference: Path, logs: Path, tag: str, at: dict) -> dict:
    """SIGKILL the trainer at ``at``, then finish the run. ``{"after_step": k, "delay_s": d}``: ``d`` seconds after
    ``log.jsonl`` shows step ``k`` (inside step ``k + 1``, or the checkpoint after ``k``); ``{"checkpoint_step": s}``:
    as soon as the folder of step ``s``'s checkpoint appears, before it is renamed into place."""
    c = Command(train_args(run_dir), logs / f"{tag}.log")
    partial = f".step-{at.get('checkpoint_step', 0):07d}.partial"
    checkpoints = run_dir / "checkpoints"
    last_record, step_seen_at = 0.0, None
    trial: dict = {"at": at}
    try:
        while c.proc.poll() is None:
            if "after_step" in at:
                if step_seen_at is None and last_step(run_dir) >= at["after_step"]:
                    step_seen_at = c.elapsed()
                if step_seen_at is not None and c.elapsed() - step_seen_at >= at["delay_s"]:
                    break
            if "checkpoint_step" in at:
                try:
                    if partial in os.listdir(checkpoints):
                        break
                except FileNotFoundError:
                    pass
            if c.elapsed() - last_record > 0.05:
                c.record()
                last_record = c.elapsed()
            time.sleep(0.001 if "checkpoint_step" in at or step_seen_at is not None else 0.02)
        if c.proc.poll() is not None:
            trial.update(killed=False, why=f"the run ended first (rc {c.proc.returncode})")
            c.wait()
            return trial
        children = c.kill()
        killed_at = round(c.elapsed(), 2)
        c.wait()
        left, gone_s = wait_gone({**c.seen, **children})
        trial.update(killed=True, killed_at_s=killed_at, children=len(children), recorded_descendants=len(c.seen),
                     survivors=left, descendants_gone_s=gone_s, last_logged_step=last_step(run_dir),
                     latest_at_kill=latest_checkpoint(run_dir))
        if "checkpoint_step" in at:
            trial["partial_left_by_kill"] = (checkpoints / partial).exists()  # the write was cut, not finished
    finally:
        c.cleanup()
    trial.update(finish_run(run_dir, reference, logs, tag))
    return trial


def sigterm_training(run_dir: Path, reference: Path, logs: Path, tag: str, after_step: int) -> dict:
    """SIGTERM once ``log.jsonl`` shows ``after_step``; the run must stop cleanly at a checkpoint and resume."""
    c = Command(train_args(run_dir), logs / f"{tag}.log")
    trial: dict = {"after_step": after_step}
    try:
        if not c.wait_until(lambda: last_step(run_dir) >= after_step, 0.02):
            trial.update(signalled=False, why=f"the run ended first (rc {c.proc.returncode})")
            c.wait()
            return trial
        children = c.kill(signal.SIGTERM)
        signalled_at = last_step(run_dir)
        try:
            rc = c.wait(120)
        except subprocess.TimeoutExpired:
            rc = None
        left, gone_s = wait_gone({**c.seen, **children})
        stopped = last_step(run_dir)
        said = [line for line in (logs / f"{tag}.log").read_text(errors="replace").splitlines()
                if line.startswith("SIGTERM")]
        trial.update(signalled=True, step_at_signal=signalled_at, rc=rc, stopped_at_step=stopped,
                     latest=latest_checkpoint(run_dir), said=said[-1] if said else None,
                     checkpoint_at_stop=latest_checkpoint(run_dir) == f"step-{stopped:07d}",
                     survivors=left, descendants_gone_s=gone_s)
    finally:
        c.cleanup()
    trial.update(finish_run(run_dir, reference, logs, tag))
    return trial


# -- shards ------------------------------------------------------------------------------------------------------

def make_images(folder: Path, n: int, seed: int) -> list[str]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        # a colour gradient plus noise: photo-sized JPEG files (tens of kB) that take real decoding work
        y, x = np.mgrid[0:160, 0:160]
        base = np.stack([x * rng.uniform(0.5, 1.5), y * rng.uniform(0.5, 1.5), (x + y) * 0.5], -1)
        pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
        name = f"img_{i:04d}.jpg"
        Image.fromarray(pixels).save(folder / name, quality=90)
        names.append(name)
    return names


def caption_lines(names: list[str]) -> list[str]:
    return [f"{name},a picture number {i} with {kind} colours" for i, name in enumerate(names)
            for kind in ("bright", "dark")]


def shard_args(images: Path, captions: Path, out: Path, per_shard: int, *extra: str) -> list[str]:
    return ["shards", "captions", "--images", str(images), "--captions", str(captions), "--out", str(out),
            "--samples-per-shard", str(per_shard), "--workers", "2", *extra]


def shard_set(out: Path) -> dict:
    """What a shard folder holds: each shard's sha256, the samples' keys and uids, the manifest without timing."""
    shards, keys, uids = {}, [], []
    for tar in sorted(out.glob("*.tar")):
        shards[tar.name] = hashlib.sha256(tar.read_bytes()).hexdigest()
        with tarfile.open(tar) as t:
            for member in t.getmembers():
                if member.name.endswith(".json"):
                    keys.append(member.name[:-5])
                    uids.append(json.load(io.BytesIO(t.extractfile(member).read()))["uid"])
    manifest = None
    if (out / "manifest.json").exists():
        manifest = json.loads((out / "manifest.json").read_text())
        manifest.pop("seconds", None)
    return {"shards": shards, "keys": keys, "uids": uids, "manifest": manifest,
            "partial": sorted(p.name for p in out.glob(".*.partial"))}


def same_set(a: dict, b: dict) -> dict:
    return {"samples_equal": len(a["uids"]) == len(b["uids"]), "uids_equal": a["uids"] == b["uids"],
            "bytes_identical": a["shards"] == b["shards"], "manifest_equal": a["manifest"] == b["manifest"],
            "samples": len(a["uids"]), "reference_samples": len(b["uids"])}


def kill_shards(images: Path, captions: Path, work: Path, logs: Path, tag: str, per_shard: int, after: int,
                clean: dict) -> dict:
    out = work / tag
    c = Command(shard_args(images, captions, out, per_shard), logs / f"{tag}.log")
    trial: dict = {"after_shards": after}
    try:
        if not c.wait_until(lambda: out.exists() and len(list(out.glob("*.tar"))) >= after, 0.002):
            trial.update(killed=False, why=f"the writer ended first (rc {c.proc.returncode})")
            c.wait()
            return trial
        children = c.kill()
        c.wait()
        at_kill = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
        left, gone_s = wait_gone({**c.seen, **children})
        time.sleep(2.0)  # time for an orphaned pool process to finish a shard and rename it, if one were left
        later = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
        trial.update(killed=True, killed_at_s=round(c.elapsed(), 2), children=len(children), survivors=left,
                     descendants_gone_s=gone_s, shards_at_kill=len(at_kill), shards_later=len(later),
                     no_shard_after_kill=later == at_kill, manifest_after_kill=(out / "manifest.json").exists(),
                     partial_after_kill=len(list(out.glob(".*.partial"))))
    finally:
        c.cleanup()
    rc, seconds = run(shard_args(images, captions, out, per_shard), logs / f"{tag}-rerun.log")
    said = tail(logs / f"{tag}-rerun.log", 1).replace(str(out), "OUT")
    trial["rerun_same_command"] = {"rc": rc, "seconds": seconds, "said": said}
    if rc != 0:
        rc2, seconds2 = run(shard_args(images, captions, out, per_shard, "--overwrite"),
                            logs / f"{tag}-rerun-overwrite.log")
        trial["rerun_overwrite"] = {"rc": rc2, "seconds": seconds2}
    trial["result"] = same_set(shard_set(out), clean)
    return trial


def bad_inputs(images: Path, names: list[str], work: Path, logs: Path) -> dict:
    """Three bad inputs among good ones, each bad one on its own caption line: the non-UTF-8 line in the middle
    of the file, the other two at its end."""
    folder = work / "bad-images"
    shutil.copytree(images, folder)
    data = (images / names[0]).read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "notutf8.jpg").write_bytes(data)  # a good image: only its caption line is bad
    good = [line.encode() for line in caption_lines(names)]
    half = len(good) // 2
    bad = {"not_utf8": ("notutf8.jpg", b"notutf8.jpg,a caf\xe9 in latin-1"),
           "missing_image": ("missing.jpg", b"missing.jpg,a picture whose file is not there"),
           "bad_image": ("truncated.jpg", b"truncated.jpg,a picture cut in half")}
    lines = [b"image,caption", *good[:half], bad["not_utf8"][1], *good[half:], bad["missing_image"][1],
             bad["bad_image"][1]]
    captions = work / "bad-captions.txt"
    captions.write_bytes(b"\n".join(lines) + b"\n")
    out = work / "bad-out"
    rc, seconds = run(shard_args(folder, captions, out, 50), logs / "bad-inputs.log")
    got = shard_set(out)
    manifest = got["manifest"] or {}
    expected_keys = sorted(f"{Path(n).stem}_{i}" for n in names for i in range(2))
    listed = {}
    for reason, (image, line) in bad.items():
        lineno = lines.index(line) + 1
        entries = [e["where"] for e in manifest.get("skipped_items", []) if e["reason"] == reason]
        listed[reason] = {"line": lineno, "listed": entries,
                          "names_file_and_line": len(entries) == 1 and entries[0].startswith(f"{captions}:{lineno}:")
                          and (reason == "not_utf8" or image in entries[0])}
    return {"rc": rc, "seconds": seconds, "samples": manifest.get("samples"), "expected_samples": len(expected_keys),
            "others_all_written": sorted(got["keys"]) == expected_keys, "skipped": manifest.get("skipped"),
            "exactly_those_skipped": manifest.get("skipped") == {"bad_image": 1, "missing_image": 1, "not_utf8": 1},
            "listed": listed}


# -- the cases ---------------------------------------------------------------------------------------------------

def run_reference(reference: Path, logs: Path) -> float:
    """The uninterrupted run every faulted one is compared with; its wall time in seconds."""
    rc, seconds = run(train_args(reference), logs / "train-reference.log")
    if rc != 0:
        raise SystemExit(f"the reference run failed (rc {rc}): {tail(logs / 'train-reference.log')}")
    return seconds


def case_kill_training(work: Path, logs: Path, rng: random.Random, n_times: int, n_checkpoints: int) -> dict:
    reference = work / "train-reference"
    ref_seconds = run_reference(reference, logs)
    times = [r["time"] for r in log_records(reference)]
    step_s = (times[-1] - times[0]) / max(len(times) - 1, 1)  # the reference's mean step, start-up excluded
    points = [{"after_step": rng.randrange(1, STEPS), "delay_s": round(rng.uniform(0, step_s), 3)}
              for _ in range(n_times)]
    steps = rng.sample(range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY), n_checkpoints)
    points += [{"checkpoint_step": s} for s in sorted(steps)]
    trials = []
    for i, at in enumerate(points):
        trial = kill_training(work / f"train-kill{i}", reference, logs, f"train-kill{i}", at)
        trials.append(trial)
        print(f"  kill -9 {i}: {json.dumps(_brief(trial))}", flush=True)
    return {"reference_seconds": ref_seconds, "reference": str(reference), "trials": trials}


def case_sigterm(work: Path, logs: Path, rng: random.Random, n: int) -> dict:
    reference = work / "train-reference"
    trials = []
    # signals after a step that is not a checkpoint step, so the stop has to write its own checkpoint
    candidates = [s for s in range(3, STEPS - 2) if s % CHECKPOINT_EVERY]
    for i, step in enumerate(sorted(rng.sample(candidates, n))):
        trial = sigterm_training(work / f"train-term{i}", reference, logs, f"train-term{i}", step)
        trials.append(trial)
        print(f"  SIGTERM {i}: {json.dumps(_brief(trial))}", flush=True)
    return {"trials": trials}


def case_kill_shards(images: Path, names: list[str], work: Path, logs: Path, rng: random.Random, n: int) -> dict:
    captions = work / "captions.txt"
    captions.write_text("image,caption\n" + "\n".join(caption_lines(names)) + "\n")
    per_shard = 10
    n_shards = -(-2 * len(names) // per_shard)
    rc, clean_seconds = run(shard_args(images, captions, work / "shards-clean", per_shard), logs / "shards-clean.log")
    if rc != 0:
        raise SystemExit(f"the clean shard run failed (rc {rc}): {tail(logs / 'shards-clean.log')}")
    clean = shard_set(work / "shards-clean")
    rerun_rc, _ = run(shard_args(images, captions, work / "shards-clean2", per_shard), logs / "shards-clean2.log")
    deterministic = rerun_rc == 0 and shard_set(work / "shards-clean2")["shards"] == clean["shards"]
    trials = []
    for i, after in enumerate(sorted(rng.sample(range(1, n_shards - 1), n))):
        trial = kill_shards(images, captions, work, logs, f"shards-kill{i}", per_shard, after, clean)
        trials.append(trial)
        print(f"  shards kill -9 {i}: {json.dumps(_brief(trial))}", flush=True)
    return {"images": len(names), "samples": len(clean["uids"]), "shards": len(clean["shards"]),
            "clean_seconds": clean_seconds, "two_clean_runs_byte_identical": deterministic, "trials": trials}


def _brief(trial: dict) -> dict:
    keep = ("at", "after_step", "after_shards", "killed", "killed_at_s", "last_logged_step", "latest_at_kill",
            "partial_left_by_kill", "survivors", "rc", "stopped_at_step", "checkpoint_at_stop", "shards_at_kill",
            "no_shard_after_kill", "rerun_same_command", "why")
    out = {k: trial[k] for k in keep if k in trial}
    if "weights" in trial:
        out["identical"] = trial["weights"]["identical"]
        out["log_ok"] = trial["log"]["steps_once_in_order"] and trial["log"]["losses_equal_reference"]
    if "result" in trial:
        out["result"] = trial["result"]
    return out


# -- the table ---------------------------------------------------------------------------------------------------

def _count(trials: list[dict], test) -> str:
    return f"{sum(1 for t in trials if test(t))}/{len(trials)}"


def _log_ok(t: dict) -> bool:
    return t["log"]["steps_once_in_order"] and t["log"]["losses_equal_reference"]


def _when(at: dict) -> str:
    return f"{at['delay_s']:.2f} s after step {at['after_step']}"


def row_kill_training(k: dict) -> dict:
    trials = [t for t in k["trials"] if t.get("killed")]
    timed = [t for t in trials if "after_step" in t["at"]]
    during = [t for t in trials if "checkpoint_step" in t["at"]]
    return {
        "case": "kill -9 during `vlp train`, resumed",
        "injected": (f"SIGKILL to the trainer ({STEPS} steps, a checkpoint every {CHECKPOINT_EVERY}, 2 loader workers) "
                     f"at {len(timed)} random times ({', '.join(_when(t['at']) for t in timed)}) and "
                     f"{len(during)} times while a checkpoint was being written (steps "
                     f"{', '.join(str(t['at']['checkpoint_step']) for t in during)}; its `.partial` folder left by the "
                     f"kill in {_count(during, lambda t: t.get('partial_left_by_kill'))}); then the same command until "
                     "it completes"),
        "times": len(trials),
        "checked": ("every tensor of `checkpoints/latest`'s `model.safetensors`, bitwise, against an uninterrupted "
                    f"run; `log.jsonl` = steps 1..{STEPS} once, in order, with the reference's losses; the trainer's "
                    f"processes gone {GONE_WITHIN_S:g} s after the kill"),
        "result": (f"weights identical in {_count(trials, lambda t: t['weights']['identical'])} kills; "
                   f"{STEPS}/{STEPS} steps logged once with the reference's losses in {_count(trials, _log_ok)}; "
                   f"no process left in {_count(trials, lambda t: not t['survivors'])} "
                   f"({sum(t['children'] for t in trials)} child processes at the kills); completed on the first "
                   f"restart in {_count(trials, lambda t: t['completed'] and len(t['restarts']) == 1)}"),
        "pass": bool(trials) and len(trials) == len(k["trials"]) and all(
            t["completed"] and t["weights"]["identical"] and _log_ok(t) and not t["survivors"] for t in trials),
    }


def row_kill_shards(s: dict) -> dict:
    trials = [t for t in s["trials"] if t.get("killed")]

    def same_command(t: dict) -> bool:
        return t["rerun_same_command"]["rc"] == 0

    def equal(t: dict) -> bool:
        return all(t["result"][x] for x in ("samples_equal", "uids_equal", "bytes_identical", "manifest_equal"))

    refused = [t for t in trials if not same_command(t)]
    return {
        "case": "kill -9 during `vlp shards captions --workers 2`",
        "injected": (f"SIGKILL to the writer ({s['images']} JPEGs, {s['samples']} samples, {s['shards']} shards of 10) "
                     f"once {', '.join(str(t['after_shards']) for t in trials)} shards existed; then the same command"),
        "times": len(trials),
        "checked": (f"writer processes gone {GONE_WITHIN_S:g} s after the kill; no shard appears or changes in the "
                    "2 s after it; the re-run's set against a clean run's (samples, uids, shard bytes, manifest)"),
        "result": (f"no process left in {_count(trials, lambda t: not t['survivors'])}; no shard after the kill in "
                   f"{_count(trials, lambda t: t['no_shard_after_kill'])}; the same command completes in "
                   f"{_count(trials, same_command)}"
                   + (f" (it refuses: \"{refused[0]['rerun_same_command']['said']}\"; re-run with `--overwrite`)"
                      if refused else "")
                   + f"; the set equals the clean run's (samples, uids, bytes, manifest) in {_count(trials, equal)}; "
                   f"two clean runs byte-identical: {'yes' if s['two_clean_runs_byte_identical'] else 'no'}"),
        "pass": bool(trials) and len(trials) == len(s["trials"]) and all(
            not t["survivors"] and t["no_shard_after_kill"] and same_command(t) and equal(t) for t in trials),
    }


def row_bad_inputs(b: dict) -> dict:
    lines = ", ".join(f"{r} line {v['line']}" for r, v in b["listed"].items())
    return {
        "case": "bad inputs to `vlp shards captions`",
        "injected": (f"a non-UTF-8 caption line, a missing image, a truncated JPEG, among {b['expected_samples']} good "
                     "samples"),
        "times": 1,
        "checked": ("skip counts; each bad input listed in `manifest.json` with file and line; every other sample "
                    "written"),
        "result": (f"{b['samples']}/{b['expected_samples']} good samples written"
                   f"{'' if b['others_all_written'] else ' (their keys differ)'}; skipped "
                   + ", ".join(f"{k} {v}" for k, v in (b["skipped"] or {}).items())
                   + f"; listed with file and line: {sum(v['names_file_and_line'] for v in b['listed'].values())}/3 "
                   f"({lines})"),
        "pass": b["rc"] == 0 and b["others_all_written"] and b["exactly_those_skipped"]
                and all(v["names_file_and_line"] for v in b["listed"].values()),
    }


def row_sigterm(g: dict) -> dict:
    trials = [t for t in g["trials"] if t.get("signalled")]
    return {
        "case": "SIGTERM to `vlp train`, resumed",
        "injected": (f"SIGTERM to the trainer once step {', '.join(str(t['after_step']) for t in trials)} was logged "
                     "(not checkpoint steps); then the same command"),
        "times": len(trials),
        "checked": ("exit status; a checkpoint at the step it stopped; the resumed run's weights and log against the "
                    "reference"),
        "result": (f"exit 0 in {_count(trials, lambda t: t['rc'] == 0)}; a checkpoint at the step it stopped in "
                   f"{_count(trials, lambda t: t['checkpoint_at_stop'])} (steps "
                   f"{', '.join(str(t['stopped_at_step']) for t in trials)}); weights identical in "
                   f"{_count(trials, lambda t: t['weights']['identical'])}; {STEPS}/{STEPS} steps logged once with the "
                   f"reference's losses in {_count(trials, _log_ok)}; no process left in "
                   f"{_count(trials, lambda t: not t['survivors'])}"),
        "pass": bool(trials) and len(trials) == len(g["trials"]) and all(
            t["rc"] == 0 and t["checkpoint_at_stop"] and t["weights"]["identical"] and t["completed"] and _log_ok(t)
            and not t["survivors"] for t in trials),
    }


ROWS = {"kill_training": row_kill_training, "kill_shards": row_kill_shards, "bad_inputs": row_bad_inputs,
        "sigterm": row_sigterm}


def markdown(rows: list[dict], meta: dict) -> str:
    head = (f"Fault injection: `{meta['command']}` on {meta['cpu']} ({meta['cores']} cores; avx512_bf16: "
            f"{'yes' if meta['avx512_bf16'] else 'no'}), seed {meta['seed']}, {meta['seconds']:.0f} s.")
    out = [head, "",
           "| case | injected | times | checked | result | pass |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['case']} | {r['injected']} | {r['times']} | {r['checked']} | {r['result']} | "
                   f"{'yes' if r['pass'] else '**NO**'} |")
    return "\n".join(out) + "\n"


def cpu() -> tuple[str, bool]:
    text = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "?")
    return name, " avx512_bf16" in text


CASES = ("kill_training", "sigterm", "kill_shards", "bad_inputs")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one fault of each kind")
    p.add_argument("--out", default=str(REPO / "benchmarks/out/fault_injection"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", default=",".join(CASES), help="a comma-separated subset of " + ", ".join(CASES))
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (run folders, shards, logs)")
    args = p.parse_args()
    cases = args.cases.split(",")
    if unknown := set(cases) - set(CASES):
        p.error(f"unknown cases {sorted(unknown)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vlp-faults-"))
    logs = work / "logs"
    logs.mkdir()
    start = time.monotonic()
    results: dict = {}

    def rng(case: str) -> random.Random:  # one stream per case: running a subset draws the same faults
        return random.Random(f"{args.seed}-{case}")

    def timed(case: str, fn, *a, **kw) -> None:
        if case in cases:
            print(case, flush=True)
            t = time.monotonic()
            results[case] = fn(*a, **kw)
            results[case]["seconds"] = round(time.monotonic() - t, 1)

    try:
        reference = work / "train-reference"
        timed("kill_training", case_kill_training, work, logs, rng("kill_training"), n_times=1 if args.quick else 3,
              n_checkpoints=1 if args.quick else 2)
        if "sigterm" in cases and not reference.exists():
            run_reference(reference, logs)
        timed("sigterm", case_sigterm, work, logs, rng("sigterm"), n=1 if args.quick else 2)
        images, names = work / "images", []
        if "kill_shards" in cases or "bad_inputs" in cases:
            names = make_images(images, 150 if args.quick else 300, seed=args.seed)
        timed("kill_shards", case_kill_shards, images, names, work, logs, rng("kill_shards"), n=1 if args.quick else 3)
        timed("bad_inputs", bad_inputs, images, names, work, logs)
        name, bf16 = cpu()
        command = (".venv/bin/python benchmarks/fault_injection.py" + (" --quick" if args.quick else "")
                   + (f" --seed {args.seed}" if args.seed else "")
                   + ("" if len(cases) == len(CASES) else f" --cases {args.cases}"))
        meta = {"command": command,
                "cpu": name, "avx512_bf16": bf16, "cores": os.cpu_count(), "seed": args.seed,
                "seconds": time.monotonic() - start, "python": sys.version.split()[0],
                "case_seconds": {c: results[c]["seconds"] for c in results}}
        rows = [row(results[case]) for case, row in ROWS.items() if case in results]
        text = markdown(rows, meta)
        print("\n" + text)
        (out / "fault_injection.md").write_text(text)
        (out / "fault_injection.json").write_text(json.dumps({"meta": meta, "rows": rows, "cases": results},
                                                             indent=1, default=str))
        print(f"written: {out / 'fault_injection.md'}, {out / 'fault_injection.json'}"
              + (f"; work folder kept: {work}" if args.keep else ""))
        return 0 if all(r["pass"] for r in rows) else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
