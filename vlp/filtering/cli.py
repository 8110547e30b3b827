"""``vlp score``, ``vlp filter``, ``vlp reshard``: the data-filtering workflow (docs/filtering.md).

    vlp score --model runs/dfn --pool 'pool/{00000..00099}.tar' --out scores/      # torchrun --nproc-per-node N ...
    vlp filter --scores scores/ --keep 'score_top=0.3' --keep 'caption_words>=2' --out selection/
    vlp reshard --pool 'pool/{00000..00099}.tar' --uids selection/uids.npy --out kept/
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

VERBS = ("score", "filter", "reshard")


def add_parser(sub) -> None:
    s = sub.add_parser("score", help="score every image-text pair of a pool of shards with a CLIP model "
                                     "(one parquet table per shard; resumable; torchrun splits the shards)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--model", required=True, help="as vlp eval takes it: NAME:TAG, NAME:/path/weights, a vlp run "
                                                  "folder, or a checkpoint file with --model-name")
    s.add_argument("--model-name", help="open_clip config of a checkpoint file")
    s.add_argument("--pool", required=True, help="shard spec, e.g. 'pool/{00000..00999}.tar', a folder, or "
                                                 "several joined with '::'")
    s.add_argument("--out", required=True, type=Path, help="scores folder")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--workers", type=int, default=1, help="decoding processes per rank")
    s.add_argument("--device", default="auto", help="auto: cuda:LOCAL_RANK where CUDA is available, else cpu")
    s.add_argument("--threads", type=int, help="torch threads on CPU (default: torch's, every core)")
    s.add_argument("--exact-decode", action="store_true",
                   help="decode every JPEG pixel (open_clip's preprocessing) instead of DCT-scaled fast decoding")
    s.add_argument("--embeddings", action="store_true",
                   help="also store float16 image and text embeddings per shard (<shard>.image.npy, .text.npy)")
    s.add_argument("--dedup-suite", help="embed the images of this evaluation suite's datasets too, so that "
                                         "vlp filter can drop their near-duplicates ('eval_dup<0.95'); implies "
                                         "--embeddings")
    s.add_argument("--data-root", type=Path, help="the suite's data_root override")

    f = sub.add_parser("filter", help="select pool samples by rules into a DataComp uid file and a report")
    f.add_argument("--scores", required=True, type=Path, help="a finished vlp score folder")
    f.add_argument("--keep", required=True, action="append", metavar="RULE",
                   help="repeatable, all must hold: score_top=0.3, score>=0.25, caption_words>=2, "
                        "caption_chars>=10, min_side>=64, width>=N, height>=N, aspect<=3, eval_dup<0.95")
    f.add_argument("--out", required=True, type=Path, help="selection folder (uids.npy, report.*)")
    f.add_argument("--samples", type=int, default=24, help="kept and dropped pairs shown in samples.md")
    f.add_argument("--seed", type=int, default=0)

    r = sub.add_parser("reshard", help="copy the samples of a uid file from a pool into new shards, without "
                                       "re-encoding")
    r.add_argument("--pool", required=True, help="shard spec of the pool")
    r.add_argument("--uids", required=True, type=Path, help="DataComp uid file (vlp filter's uids.npy)")
    r.add_argument("--out", required=True, type=Path)
    r.add_argument("--samples-per-shard", type=int, default=10000)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--overwrite", action="store_true", help="replace a finished shard set in --out")


def run(args) -> int:
    if args.verb == "score":
        return run_score(args)
    if args.verb == "filter":
        from vlp.filtering.select import filter_scores, format_report

        report = filter_scores(args.scores, args.keep, args.out, samples=args.samples, seed=args.seed)
        print(format_report(report))
        return 0
    from vlp.filtering.reshard import format_report, reshard

    manifest = reshard(args.pool, args.uids, args.out, samples_per_shard=args.samples_per_shard,
                       workers=args.workers, overwrite=args.overwrite)
    print(format_report(manifest, args.out))
    return 0


def run_score(args) -> int:
    import torch

    from vlp.eval.models import load_model
    from vlp.filtering import score

    rank, world_size, local_rank = score.distributed_env()
    device = args.device
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and args.threads:
        # By default torch keeps every core: scoring is bound by the image tower, and the decoding worker needs a
        # fraction of a core (ViT-B/32 on 2 idle cores: 1 thread + 1 worker scores at 0.8x a plain 2-thread loop;
        # benchmarks/score_speed.py). Under load, fewer threads can be faster: --threads.
        torch.set_num_threads(args.threads)
    opts = score.ScoreOptions(batch_size=args.batch_size, workers=args.workers, fast_decode=not args.exact_decode,
                              embeddings=args.embeddings or bool(args.dedup_suite))
    start = time.time()
    torch.manual_seed(0)  # a model without weights (smoke tests) is then the same on every rank
    model = load_model(args.model, args.model_name, device)
    done = score.score_pool(model, args.pool, args.out, opts, rank, world_size)
    eval_sets = None
    if args.dedup_suite and rank == 0:
        eval_sets = score.embed_eval_sets(model, args.dedup_suite, args.out, opts, args.data_root)
    if world_size > 1:
        _barrier()
    if rank == 0:
        manifest = score.finish(args.pool, args.out, model.describe, opts, eval_sets, time.time() - start)
        print(score.format_summary(manifest, args.out))
    else:
        print(f"rank {rank}: scored {done['rows']:,} samples of {done['shards']} shards")
    return 0


def _barrier() -> None:
    """Wait for every rank's shards before the manifest: a process group only for this (gloo; no tensors move),
    with a timeout long enough for ranks whose shard counts differ."""
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(days=1))
    dist.barrier()
    dist.destroy_process_group()
