"""``vlp score``: the cosine of every image-text pair of a pool, one table per pool shard (DFN's filter score).

Work is split by whole shards: over ``torchrun`` ranks (shard ``i`` belongs to rank ``i % world_size``), then over
each rank's decoding workers. A shard's table (``vlp.filtering.table``) is written atomically once all its samples
are scored, so a stopped run restarts at the shards without a table and never writes a uid twice. Every sample of
a readable shard gets a row: one that cannot be scored (undecodable image, no caption, no uid) has an empty score and
the reason. A damaged tar keeps the rows read before the damage, and the damage is recorded with the shard.

Texts go through the model's text tower packed (vlp's own computation, the same arithmetic as open_clip's padded
one up to summation order); images through open_clip's eval transform, exact with ``fast_decode=False``.
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from vlp import atomic
from vlp.data import BadSample, ImageDecoder, ImageOptions
from vlp.data.lifetime import die_with_parent
from vlp.data.shards import expand_urls, iter_raw_samples
from vlp.filtering.table import FORMAT, MANIFEST, SCHEMA

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass
class ScoreOptions:
    batch_size: int = 256
    workers: int = 1
    fast_decode: bool = True  # DCT-scaled JPEG decode (vlp.data's draft); False gives open_clip's exact pixels
    embeddings: bool = False  # also store float16 image and text embeddings per shard
    progress: bool = True


def stem(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return name[:-4] if name.endswith(".tar") else name


def table_name(url: str) -> str:
    return f"{stem(url)}.parquet"


def _caption(sample: dict) -> str | None:
    text = sample.get("txt")
    if text is None:
        return None
    try:
        return text.decode("utf-8").strip() or None
    except UnicodeDecodeError:
        return None


def _row(sample: dict, url: str) -> dict:
    """The table row of a raw sample, without its score; ``error`` says why it cannot be scored."""
    row = {"uid": None, "key": sample["__key__"], "shard": url, "index": sample["__index__"], "score": None,
           "caption_chars": None, "caption_words": None, "width": None, "height": None, "error": None}
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
        row["uid"] = meta.get("uid") if isinstance(meta, dict) else None
    except (ValueError, UnicodeDecodeError):
        row["error"] = "bad_json"
    caption = _caption(sample)
    if caption is not None:
        row["caption_chars"], row["caption_words"] = len(caption), len(caption.split())
    image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if image is not None:
        try:
            with Image.open(io.BytesIO(image)) as img:  # header only: the size as stored
                row["width"], row["height"] = img.size
        except Exception:  # noqa: BLE001 - PIL raises many types; the decode below names the failure
            pass
    if row["error"] is None:
        if image is None:
            row["error"] = "no_image"
        elif caption is None:
            row["error"] = "no_caption"
        elif not row["uid"]:
            row["error"] = "no_uid"
    return row


class _ShardReader(IterableDataset):
    """Chunks of at most ``batch_size`` samples, each from one shard: ``(shard number, rows, images of the rows
    without error (uint8), captions of those rows, last chunk of the shard?, damage)``. Each decoding worker reads
    whole shards, so a shard's chunks arrive in order."""

    def __init__(self, urls: list[str], image: ImageOptions, batch_size: int):
        self.urls, self.image, self.batch_size = urls, image, batch_size

    def __iter__(self):
        info = get_worker_info()
        if info is not None:
            die_with_parent(os.getppid())
        mine = range(len(self.urls)) if info is None else range(info.id, len(self.urls), info.num_workers)
        decoder = ImageDecoder(self.image)
        for number in mine:
            yield from self._shard(number, decoder)

    def _shard(self, number: int, decoder: ImageDecoder) -> Iterator[tuple]:
        url = self.urls[number]
        damage: list[tuple[str, str]] = []
        rows, images, captions = [], [], []
        for sample in iter_raw_samples(url, on_error=lambda reason, where: damage.append((reason, where))):
            row = _row(sample, url)
            if row["error"] is None:
                data = next(sample[k] for k in IMAGE_KEYS if k in sample)
                try:
                    images.append(decoder(data, None))
                    captions.append(_caption(sample))
                except BadSample as e:
                    row["error"] = f"bad_image: {e}"
            rows.append(row)
            if len(rows) == self.batch_size:
                yield number, rows, _stack(images), captions, False, None
                rows, images, captions = [], [], []
        yield number, rows, _stack(images), captions, True, damage


def _stack(images: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.stack(images) if images else None



class _Pending:
    """One shard's rows and embeddings while its chunks arrive."""

    def __init__(self):
        self.rows: list[dict] = []
        self.image: list[np.ndarray] = []
        self.text: list[np.ndarray] = []


def distributed_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def score_pool(model, pool: str | list[str], out: str | Path, opts: ScoreOptions | None = None,
               rank: int | None = None, world_size: int | None = None) -> dict:
    """Score this rank's shards of ``pool`` into ``out``; returns what this rank did (shards, rows, seconds).
    ``model`` is a :class:`vlp.eval.models.OpenClipModel`. The manifest is written by :func:`finish`."""
    opts = opts or ScoreOptions()
    env_rank, env_world, _ = distributed_env()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    out = Path(out)
    urls = expand_urls(pool)
    _check_names(urls)
    mine = [u for i, u in enumerate(urls) if i % world_size == rank and not (out / table_name(u)).exists()]
    done = sum(1 for i, u in enumerate(urls) if i % world_size == rank) - len(mine)
    if done:
        log.info("rank %d: %d shards already scored in %s, %d to go", rank, done, out, len(mine))
    out.mkdir(parents=True, exist_ok=True)
    _use_packed_text(model)
    from vlp.eval.images import image_options, normalize

    image = image_options(model.preprocess, opts.fast_decode)
    reader = _ShardReader(mine, image, opts.batch_size)
    loader = DataLoader(reader, batch_size=None, num_workers=min(opts.workers, len(mine)),
                        collate_fn=None, prefetch_factor=4 if opts.workers else None)
    pending: dict[int, _Pending] = {}
    start, rows_done = time.time(), 0
    bar = tqdm(total=len(mine), unit="shard", desc=f"score rank {rank}" if world_size > 1 else "score",
               disable=not opts.progress)
    with torch.inference_mode():
        for number, rows, images, captions, last, damage in loader:
            shard = pending.setdefault(number, _Pending())
            if images is not None:
                img = model.model.encode_image(normalize(images, image.mean, image.std).to(model.device),
                                               normalize=True).float()
                txt = _encode_text(model, captions)
                scores = (img * txt).sum(-1).cpu().numpy()
                ok = [r for r in rows if r["error"] is None]
                for r, s in zip(ok, scores):
                    r["score"] = float(s)
                if opts.embeddings:
                    shard.image.append(_rows_of(img, rows))
                    shard.text.append(_rows_of(txt, rows))
            elif opts.embeddings and rows:
                shard.image.append(_rows_of(None, rows))
                shard.text.append(_rows_of(None, rows))
            shard.rows.extend(rows)
            rows_done += len(rows)
            if last:
                _write_shard(out, mine[number], pending.pop(number), damage, opts.embeddings)
                bar.update(1)
                bar.set_postfix_str(f"{rows_done / max(time.time() - start, 1e-9):.0f} samples/s")
    bar.close()
    return {"rank": rank, "shards": len(mine), "rows": rows_done, "seconds": time.time() - start}


def _check_names(urls: list[str]) -> None:
    seen: dict[str, str] = {}
    for u in urls:
        name = table_name(u)
        if name in seen:
            raise ValueError(f"pool shards {seen[name]} and {u} would share the table {name}; give shards "
                             "distinct file names")
        seen[name] = u


def _use_packed_text(model) -> None:
    """The evaluators build models with open_clip's padded text computation (their figures must be CLIP_benchmark's
    to the last digit); scoring reads a cosine to 1e-4 and takes the packed one, several times cheaper on captions
    far shorter than the context."""
    from vlp.models.text import why_not_packed

    model.model.packed = why_not_packed(model.model.clip) is None


def _encode_text(model, captions: list[str]) -> torch.Tensor:
    tokens = model.tokenizer(captions).to(model.device)
    kind = model.text_kind if model.model.prefix else None
    return model.model.encode_text(tokens, normalize=True, kind=kind).float()


def _rows_of(features: torch.Tensor | None, rows: list[dict]) -> np.ndarray:
    """float16 embeddings for every row of a chunk, NaN where the row was not scored."""
    dim = features.shape[1] if features is not None else 1
    full = np.full((len(rows), dim), np.nan, dtype=np.float16)
    if features is not None:
        ok = [i for i, r in enumerate(rows) if r["error"] is None]
        full[ok] = features.cpu().numpy().astype(np.float16)
    return full


def _join(chunks: list[np.ndarray]) -> np.ndarray:
    dim = max((c.shape[1] for c in chunks), default=1)
    return np.concatenate([c if c.shape[1] == dim else np.full((len(c), dim), np.nan, np.float16)
                           for c in chunks]) if chunks else np.zeros((0, dim), np.float16)


def _write_shard(out: Path, url: str, shard: _Pending, damage: list[tuple[str, str]] | None,
                 embeddings: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = stem(url)
    if embeddings:  # before the table: a table on disk means everything of its shard is there
        for kind, chunks in (("image", shard.image), ("text", shard.text)):
            buffer = io.BytesIO()
            np.save(buffer, _join(chunks))
            atomic.write_bytes(out / f"{name}.{kind}.npy", buffer.getvalue())
    metadata = {"vlp.damage": json.dumps([{"reason": r, "where": w} for r, w in damage or []])}
    table = pa.Table.from_pylist(shard.rows, schema=SCHEMA.with_metadata(metadata))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic.write_bytes(out / table_name(url), buffer.getvalue(), fsync=True)


def finish(pool: str | list[str], out: str | Path, model_describe: dict, opts: ScoreOptions,
           eval_sets: dict | None = None, seconds: float | None = None) -> dict:
    """The manifest, from the tables on disk (so it is right however many runs and ranks wrote them); an error
    naming the shards still unscored."""
    import pyarrow.parquet as pq

    out = Path(out)
    urls = expand_urls(pool)
    missing = [u for u in urls if not (out / table_name(u)).exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} pool shards have no table in {out} yet (e.g. {missing[0]}); "
                           "run vlp score again to finish them")
    shards, totals, failed_total = [], {"rows": 0, "scored": 0}, {}
    for u in urls:
        path = out / table_name(u)
        table = pq.read_table(path, columns=["score", "error"])
        damage = json.loads((table.schema.metadata or {}).get(b"vlp.damage", b"[]"))
        errors = [e.split(":", 1)[0] for e in table.column("error").to_pylist() if e is not None]
        failed = {}
        for reason in errors + [d["reason"] for d in damage]:
            failed[reason] = failed.get(reason, 0) + 1
        scored = table.num_rows - len(errors)
        image_npy = f"{stem(u)}.image.npy"
        shards.append({"url": u, "table": path.name, "rows": table.num_rows, "scored": scored, "failed": failed,
                       "damage": damage, "image_embeddings": image_npy if (out / image_npy).exists() else None})
        totals["rows"] += table.num_rows
        totals["scored"] += scored
        for k, v in failed.items():
            failed_total[k] = failed_total.get(k, 0) + v
    manifest = {"format": FORMAT, "pool": pool, "model": model_describe, "rows": totals["rows"],
                "scored": totals["scored"], "failed": dict(sorted(failed_total.items())),
                "options": {"fast_decode": opts.fast_decode, "embeddings": opts.embeddings},
                "eval_sets": eval_sets or {}, "shards": shards}
    if seconds is not None:
        manifest["seconds"] = round(seconds, 2)
    atomic.write_text(out / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False), fsync=True)
    return manifest


def embed_eval_sets(model, suite: str, out: str | Path, opts: ScoreOptions, data_root=None) -> dict:
    """Image embeddings (float16, normalised) of every dataset of an evaluation suite, for removing pool images
    that duplicate them (``vlp filter --keep 'eval_dup<0.95'``)."""
    from vlp.eval.features import FeatureOptions, FeatureStore
    from vlp.eval.images import LoadOptions
    from vlp.eval.suite import load_suite

    out = Path(out)
    found = load_suite(suite, data_root)
    store = FeatureStore(model, FeatureOptions(load=LoadOptions(batch_size=opts.batch_size, workers=opts.workers,
                                                                fast_decode=opts.fast_decode), cache_dir=None,
                                               progress=opts.progress))
    sets = {}
    for name, dataset in found.datasets.items():
        path = out / "eval" / f"{name}.npy"
        if not path.exists():
            with torch.inference_mode():
                features = torch.nn.functional.normalize(store.images(dataset.image_set()).features, dim=-1)
            buffer = io.BytesIO()
            np.save(buffer, features.numpy().astype(np.float16))
            atomic.write_bytes(path, buffer.getvalue())
        sets[name] = {"file": f"eval/{name}.npy", "images": int(np.load(path, mmap_mode="r").shape[0]),
                      "suite": suite}
    return sets


def format_summary(manifest: dict, out: str | Path) -> str:
    lines = [f"scored {manifest['scored']:,} of {manifest['rows']:,} samples in {len(manifest['shards'])} shards "
             f"-> {out}"]
    if manifest["failed"]:
        lines.append("not scored: " + ", ".join(f"{k} {v:,}" for k, v in manifest["failed"].items()))
    for name, entry in manifest["eval_sets"].items():
        lines.append(f"evaluation images of {name}: {entry['images']:,} embedded ({entry['file']})")
    return "\n".join(lines)
