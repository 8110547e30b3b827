"""``vlp <verb>``: thin wrappers over the package (shards, demo, eval, train, score, filter, reshard)."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from vlp.data import sources
from vlp.data.writer import WriterOptions, format_report, write_shards


def _add_writer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
    p.add_argument("--source", help="dataset name stored in every sample's json (default: derived from the input)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2, help="parallel writer processes")
    p.add_argument("--resize", type=int, help="shrink images so the shorter side is at most this (re-encodes them)")
    p.add_argument("--no-verify", action="store_true", help="do not decode images while writing (faster; broken "
                   "images are then only caught when streamed)")
    p.add_argument("--name", default="{index:05d}.tar", help="shard file name pattern")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard set in --out")


def _shards_parser(sub) -> None:
    p = sub.add_parser("shards", help="write WebDataset shards from real inputs, or inspect a shard set")
    kinds = p.add_subparsers(dest="kind", required=True)

    c = kinds.add_parser("captions", help="an image folder + a caption file (Flickr8k layout: image,caption)")
    c.add_argument("--images", required=True)
    c.add_argument("--captions", required=True)
    c.add_argument("--split", help="file with one image name per line; only those images are written")
    c.add_argument("--per-image", action="store_true",
                   help="one sample per image (txt = first caption) instead of one per caption; "
                        "json['captions'] always holds all of them")
    _add_writer_flags(c)

    f = kinds.add_parser("folder", help="a labelled image folder <root>/<class>/<image> (e.g. CIFAR-10)")
    f.add_argument("--root", required=True)
    _add_writer_flags(f)

    i = kinds.add_parser("identities", help="identity folders <root>/<person>/<image> (e.g. pedestrian re-ID)")
    i.add_argument("--root", required=True)
    i.add_argument("--captions", choices=("none", "attributes"), default="none",
                   help="'attributes': pseudo-captions from clothing colours read off each crop (vlp.data.attributes; "
                        "txt + json['captions'] + json['attributes']); default: no text")
    _add_writer_flags(i)

    t = kinds.add_parser("table", help="a CSV or parquet list of (image path, caption, extra columns)")
    t.add_argument("--list", required=True, dest="table")
    t.add_argument("--image-column", default="image")
    t.add_argument("--caption-column", default="caption")
    t.add_argument("--base", help="folder that relative image paths start from (default: the list's folder)")
    _add_writer_flags(t)

    s = kinds.add_parser("info", help="shards and exact sample counts of a spec (manifest or header scan); an "
                         "incomplete set (a writer stopped before its end) is reported with a warning, exit 0")
    s.add_argument("spec", help="e.g. 'data/{00000..00009}.tar', a folder, or several joined with '::'")


def run_shards(args) -> int:
    if args.kind == "info":
        from vlp.data.shards import check_complete, expand

        shards = expand(args.spec)
        known = [s.samples for s in shards if s.samples is not None]
        for s in shards:
            print(f"{s.url}\t{'?' if s.samples is None else s.samples}")
        incomplete = check_complete(args.spec)
        print(f"{len(shards)} shards, {sum(known):,} samples" + ("" if len(known) == len(shards) else
                                                                 f" in the {len(known)} of known size")
              + (" (INCOMPLETE set: only the shards written so far)" if incomplete else ""))
        if incomplete:
            # Exit 0 all the same: the counts are exact for what exists, and inspecting a set is not an error.
            print(f"vlp shards info: warning: incomplete shard set: {incomplete}", file=sys.stderr)
        return 0
    if args.kind == "captions":
        source = args.source or "captions"
        items = sources.caption_file(args.images, args.captions, args.split, source, per_caption=not args.per_image)
    elif args.kind == "folder":
        source = args.source or "labels"
        items = sources.labelled_folder(args.root, source)
    elif args.kind == "identities":
        source = args.source or "identities"
        captioner = None
        if args.captions == "attributes":
            from vlp.data.attributes import caption_image

            captioner = caption_image
        items = sources.identity_folders(args.root, source, captioner)
    else:
        items = sources.table(args.table, args.image_column, args.caption_column, args.base, args.source)
        source = args.source
    opts = WriterOptions(samples_per_shard=args.samples_per_shard, workers=args.workers, resize=args.resize,
                         verify=not args.no_verify, name=args.name, overwrite=args.overwrite)
    manifest = write_shards(items, args.out, opts, source=source)
    print(format_report(manifest, args.out))
    return 0


# verb -> the module that owns its flags (``add_parser(sub)``, which may add several verbs, and ``run(args)``)
PLUGGED_VERBS = {"eval": "vlp.eval.cli", "train": "vlp.train.cli",
                 "score": "vlp.filtering.cli", "filter": "vlp.filtering.cli", "reshard": "vlp.filtering.cli"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="verb", required=True)
    _shards_parser(sub)
    d = sub.add_parser("demo", help="the whole pipeline on data scikit-learn ships (digits), in a few minutes")
    d.add_argument("--out", default="runs/demo", help="run folder")
    d.add_argument("--quick", action="store_true", help="a few steps only (used by the tests)")
    for module in dict.fromkeys(PLUGGED_VERBS.values()):
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.verb == "shards":
            return run_shards(args)
        if args.verb == "demo":
            from vlp.demo import run_demo

            return run_demo(args.out, quick=args.quick)
        return importlib.import_module(PLUGGED_VERBS[args.verb]).run(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"vlp {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
