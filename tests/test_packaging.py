"""vlp as users get it from ``pip install``: a wheel built from the working tree, installed into a fresh virtual
environment, runs ``vlp demo`` and ``vlp eval --suite smoke`` from a folder outside the repository, reading the
suites, prompts and the demo's config that the wheel carries (vlp/resources).

The fresh environment reuses this one's installed dependencies through a ``.pth`` line naming our
site-packages folder. A plain folder line only extends sys.path: the ``.pth`` files inside that folder (among
them the editable install's import hook) are not run, so ``import vlp`` can only find the wheel's copy, which
the first test asserts.
"""
from __future__ import annotations

import csv
import filecmp
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from vlp import resources

from conftest import REPO, SHARED_DATA, require_shared_data  # noqa: E402

SHIPPED = {"eval": ("prompts/*.yaml", "suites/*.yaml"), "configs": ("*.yaml",)}


def shipped_files() -> list[Path]:
    """The repository's files that the wheel must carry, relative to the repository root."""
    return sorted(path.relative_to(REPO) for folder, patterns in SHIPPED.items()
                  for pattern in patterns for path in (REPO / folder).glob(pattern))


def test_source_tree_reads_the_top_level_folders():
    """vlp/resources links to the folders people edit, so a source checkout has no copy that could drift."""
    assert resources.path("eval") == (REPO / "eval").resolve()
    assert resources.path("configs") == (REPO / "configs").resolve()


def copy_working_tree(dest: Path) -> None:
    """The files a clone holds plus new ones not yet committed (what git neither tracks nor ignores), so the
    build sees neither build/ leftovers nor caches. Links are copied as links."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src, dst = REPO / name, dest / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree, not yet in git
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 300) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A wheel of the working tree installed in a fresh venv: its paths and the environment to run it in."""
    if importlib.util.find_spec("setuptools") is None or shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("building a wheel of the working tree needs setuptools, git and a git checkout")
    tmp = tmp_path_factory.mktemp("packaging")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLP_EVAL_DIR", "VLP_EVAL_DATA_ROOT")}
    env["VLP_CACHE"] = str(tmp / "cache")
    copy_working_tree(tmp / "src")
    # No build isolation: it would download setuptools; the one installed here builds the wheel.
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
         str(tmp / "dist"), str(tmp / "src")], tmp, env)
    (wheel,) = (tmp / "dist").glob("vlp-*.whl")

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env)
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env).strip())
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "vlp-test-dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    # pip comes from our site-packages too. --ignore-installed: pip sees our editable vlp through the .pth line
    # and must neither skip the wheel for it nor try to uninstall it.
    run([str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", "--no-index", "--quiet",
         str(wheel)], tmp, env)
    work = tmp / "work"  # a folder outside the repository: nothing is found relative to the working folder
    work.mkdir()
    return {"wheel": wheel, "site": site, "python": python, "vlp": venv / "bin" / "vlp", "env": env, "work": work}


def test_the_wheel_carries_the_resources_and_is_what_imports(installed):
    with zipfile.ZipFile(installed["wheel"]) as whl:
        names = set(whl.namelist())
        for rel in shipped_files():
            packed = f"vlp/resources/{rel.as_posix()}"
            assert packed in names, f"{packed} is missing from {installed['wheel'].name}"
            assert whl.read(packed) == (REPO / rel).read_bytes(), packed
    probe = ("import vlp, vlp.resources as r, vlp.eval.prompts as p; "
             "print(vlp.__file__); print(p.eval_dir()); print(r.path('configs', 'digits-tiny.yaml'))")
    module, eval_dir, config = run([str(installed["python"]), "-c", probe], installed["work"],
                                   installed["env"]).split()
    for found in (module, eval_dir, config):
        assert Path(found).is_relative_to(installed["site"]), f"{found} is not the wheel's copy"
    assert filecmp.cmp(config, REPO / "configs" / "digits-tiny.yaml", shallow=False)


@pytest.fixture(scope="module")
def demo_run(installed) -> Path:
    run([str(installed["vlp"]), "demo", "--quick", "--out", "demo"], installed["work"], installed["env"])
    return installed["work"] / "demo"


def test_demo_from_the_wheel(installed, demo_run):
    (result,) = (demo_run / "eval").glob("step-*/digits__zeroshot_classification.json")
    metrics = json.loads(result.read_text())["metrics"]
    assert metrics["images"] == 1797 - 1433 and metrics["acc5"] >= metrics["acc1"]
    logged = [json.loads(line) for line in (demo_run / "log.jsonl").read_text().splitlines()]
    assert [r["eval"] for r in logged if "eval" in r][-1]["digits/zeroshot_classification/acc1"] == metrics["acc1"]
    assert (demo_run / "config.yaml").is_file() and (demo_run / "plots" / "loss.png").stat().st_size > 1000
    assert (demo_run / "checkpoints" / "latest").exists()
    manifest = json.loads((Path(installed["env"]["VLP_CACHE"]) / "builtin/digits/shards/manifest.json").read_text())
    assert manifest["samples"] == 1433


def test_smoke_suite_from_the_wheel(installed, demo_run):
    require_shared_data()
    out = installed["work"] / "smoke"
    # The shipped smoke suite's data_root is relative to the repository's eval/suites, so an installed vlp is
    # told where the data is.
    run([str(installed["vlp"]), "eval", "--model", str(demo_run), "--suite", "smoke", "--data-root",
         str(SHARED_DATA), "--out", str(out), "--no-cache", "--workers", "0", "--batch-size", "128"],
        installed["work"], installed["env"])
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["dataset"] for r in rows] == ["cifar10", "flickr8k", "pedestrians", "cifar10", "average"]
    cifar = json.loads((out / "cifar10__zeroshot_classification.json").read_text())
    assert cifar["model"] == "vlp-tiny-32" and cifar["metrics"]["images"] == 200
    correct = cifar["metrics"]["acc1"] * 200  # a count of the 200 images, as a fraction
    assert abs(correct - round(correct)) < 1e-6 and cifar["text_kind"] is None  # no prefix: no kind recorded
    flickr = json.loads((out / "flickr8k__zeroshot_retrieval.json").read_text())["metrics"]
    assert (flickr["images"], flickr["texts"]) == (100, 500)
