"""Evaluation datasets: one reader per on-disk format, chosen by ``format`` in a suite file.

| format | layout | kind |
|---|---|---|
| ``wds`` | CLIP_benchmark's webdataset layout (:mod:`vlp.eval.wds_layout`) | from ``dataset_type.txt`` |
| ``folder`` | torchvision ImageFolder: ``<path>[/<split>]/<class>/<image>`` | classification |
| ``captions`` | image folder + caption file in Flickr8k's layout (+ split file) | retrieval |
| ``shards`` | vlp shards (:func:`vlp.data.write_shards`): captions, or labels with ``kind: classification`` | either |
| ``identity`` | ``<path>/{query,gallery}/<person>/<image>`` (+ optional query captions) | identity |

Every reader's ``check()`` validates what can be validated without a model (paths, class names against labels,
templates) and raises :class:`DatasetError` naming the file; the suite calls it for every dataset before any
model is built. Nothing is dropped silently: a folder with no readable image is an error, and files a reader does not
take (by extension) or samples a shard writer skipped are counted in :meth:`EvalDataset.dropped`, which every result
file records.
"""
from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from vlp.data.shards import ShardSpecError, expand, is_local, local_path, read_manifest
from vlp.data.sources import Item, caption_file, grouped_images
from vlp.eval import prompts, wds_layout
from vlp.eval.images import FileImages, ImageSet, ShardImages, merge_by_image
from vlp.registry import Registry

FORMATS: Registry[type["EvalDataset"]] = Registry("dataset format", attribute="format")
register_format = FORMATS.register

class DatasetError(ValueError):
    pass


class EvalDataset(ABC):
    format: ClassVar[str]
    Options: ClassVar[type]
    kind: str  # "classification" | "retrieval" | "identity"

    def __init__(self, name: str, options, where: str, base: Path):
        self.name, self.options, self.where, self.base = name, options, where, base
        self.classnames: list[str] | None = None
        self.templates: list[str] | None = None
        self.prompt_sources: dict[str, str] = {}
        self.unsupported: dict[str, dict[str, int]] = {}  # folder -> {suffix: files not read}
        self.skipped_when_written: dict[str, int] = {}  # reason -> samples the shard writer left out

    @abstractmethod
    def check(self) -> None: ...

    @abstractmethod
    def image_set(self, split: str | None = None) -> ImageSet: ...

    def describe(self) -> dict:
        options = {k: v for k, v in vars(self.options).items()
                   if v is not None and k not in ("classnames", "templates")}
        return {"name": self.name, "format": self.format, "kind": self.kind, **options}

    def dropped(self) -> dict:
        """What the source holds that is not evaluated: files of a type no reader takes, per folder and suffix,
        and samples skipped when the shards were written, per reason."""
        return {"unsupported_files": self.unsupported, "skipped_when_written": self.skipped_when_written}

    def _grouped_images(self, root: Path, group: str) -> list[tuple[int, str, Path]]:
        """:func:`vlp.data.sources.grouped_images`, every group folder holding an image; files of other types are
        counted into :meth:`dropped`."""
        self._exists(root, "image folder")
        other = Counter()
        try:
            found = grouped_images(root, group, other, require_images=True)
        except ValueError as e:
            raise self._fail(str(e)) from None
        if other:
            self.unsupported[str(root)] = dict(sorted(other.items()))
        return found

    # -- shared checks ---------------------------------------------------------------------------------
    def _fail(self, message: str) -> DatasetError:
        return DatasetError(f"{self.where}: {message}")

    def _exists(self, path: Path, what: str = "path") -> Path:
        if not path.exists():
            raise self._fail(f"{what} {path} does not exist")
        return path

    def _prompts(self, default_names: tuple[list[str], str] | None,
                 default_templates: tuple[list[str], str] | None) -> None:
        """Class names and templates: the suite's value, else the layout's, else (templates only) the registry
        entry named like the dataset."""
        try:
            names = prompts.resolve(self.options.classnames, "classnames", self.base, f"{self.where}.classnames")
            templates = prompts.resolve(self.options.templates, "templates", self.base, f"{self.where}.templates")
            if templates is None and default_templates is None and self.name in prompts.registry_names():
                found = prompts.registry_list(self.name, "templates")
                templates = (found, f"eval/prompts/{self.name}.yaml") if found else None
        except prompts.PromptError as e:
            raise DatasetError(str(e)) from e
        names = names or default_names
        templates = templates or default_templates
        if names:
            self.classnames, self.prompt_sources["classnames"] = names
        if templates:
            try:
                prompts.check_templates(*templates)
            except prompts.PromptError as e:
                raise DatasetError(str(e)) from e
            self.templates, self.prompt_sources["templates"] = templates

    def _check_labels(self, labels: list[int], where: str) -> None:
        if not labels:
            raise self._fail(f"{where} holds no labelled sample")
        source = self.prompt_sources.get("classnames", "class names")
        if self.classnames is None:
            raise self._fail(f"no class names for the labels in {where}: give classnames: in the suite entry")
        if min(labels) < 0 or max(labels) >= len(self.classnames):
            raise self._fail(f"{source} has {len(self.classnames)} class names but the labels in {where} run from "
                             f"{min(labels)} to {max(labels)}: the class-name file does not match the labels")


@register_format("wds")
class WdsDataset(EvalDataset):
    kind = "classification"  # until check() has read dataset_type.txt
    @dataclass
    class Options:
        path: str
        split: str = "test"
        classnames: str | list[str] | None = None
        templates: str | list[str] | None = None

    def check(self) -> None:
        root = self._exists(self.base / self.options.path, "dataset folder")
        try:
            shards = wds_layout.shard_paths(root, self.options.split)
            self.kind = wds_layout.dataset_type(root)
        except (FileNotFoundError, ValueError) as e:
            raise self._fail(str(e)) from e
        if self.kind == "classification":
            try:
                found = [(prompts.read_list_file(root / f), str(root / f)) if (root / f).exists() else None
                         for f in (wds_layout.CLASSNAMES, wds_layout.TEMPLATES)]
            except prompts.PromptError as e:
                raise self._fail(str(e)) from e
            self._prompts(found[0], found[1])
            labels = [label for shard in shards for label in wds_layout.scan_labels(shard)]
            self._check_labels(labels, str(root / self.options.split))

    def image_set(self, split: str | None = None) -> ImageSet:
        root, split = self.base / self.options.path, split or self.options.split
        try:
            shards = wds_layout.shard_paths(root, split)
        except (FileNotFoundError, ValueError) as e:
            raise self._fail(str(e)) from e
        spec = "::".join(str(p) for p in shards)
        if self.kind == "retrieval":
            def record(batch, i):
                return {"key": batch["key"][i], "captions": batch["caption"][i].splitlines()}
        else:
            def record(batch, i):
                return {"key": batch["key"][i], "label": int(batch["label"][i])}
        return ShardImages(f"{self.name}/{split}", spec, record, extra={"kind_read": self.kind})


@register_format("folder")
class FolderDataset(EvalDataset):
    kind = "classification"

    @dataclass
    class Options:
        path: str
        split: str | None = None  # subfolder holding the class folders (e.g. test); linear probes add train
        classnames: str | list[str] | None = None
        templates: str | list[str] | None = None
        max_per_class: int | None = None  # the first N images of each class (sorted by name): a fixed subset

    def _root(self, split: str | None) -> Path:
        root = self.base / self.options.path
        return root / split if split else root

    def _classes(self, root: Path) -> list[str]:
        self._exists(root, "image folder")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise self._fail(f"{root} holds no class folder (<root>/<class>/<image> expected)")
        return classes

    def check(self) -> None:
        root = self._root(self.options.split)
        classes = self._classes(root)
        self._grouped_images(root, "class")
        self._prompts((classes, f"the folder names in {root}"), None)
        source = self.prompt_sources["classnames"]
        if len(self.classnames) != len(classes):
            raise self._fail(f"{source} has {len(self.classnames)} class names but {root} has {len(classes)} "
                             "class folders: the class-name file does not match the labels")
        if set(self.classnames) == set(classes) and self.classnames != classes:
            raise self._fail(f"{source} names the class folders of {root} in another order; labels follow the "
                             "sorted folder names, so every class would get another's name")

    def image_set(self, split: str | None = None) -> ImageSet:
        root = self._root(split or self.options.split)
        if self._classes(root) != self._classes(self._root(self.options.split)):
            raise self._fail(f"{root} and {self._root(self.options.split)} have different class folders")
        paths, records, taken = [], [], {}
        for label, name, path in self._grouped_images(root, "class"):
            if self.options.max_per_class is not None and taken.get(label, 0) >= self.options.max_per_class:
                continue
            taken[label] = taken.get(label, 0) + 1
            paths.append(str(path))
            records.append({"key": f"{name}/{path.name}", "label": label})
        return FileImages(f"{self.name}/{split or self.options.split or ''}", paths, records,
                          extra={"max_per_class": self.options.max_per_class})


@register_format("captions")
class CaptionDataset(EvalDataset):
    kind = "retrieval"

    @dataclass
    class Options:
        images: str
        captions: str
        split_file: str | None = None  # image names of the split, one a line
        limit: int | None = None  # the first N images of the split

    def check(self) -> None:
        self._exists(self.base / self.options.images, "image folder")
        self._exists(self.base / self.options.captions, "caption file")
        if self.options.split_file:
            self._exists(self.base / self.options.split_file, "split file")
        self._items()

    def _items(self) -> list[Item]:
        """Every image of the split with its captions; a bad line or an image that is not there is an error naming
        the caption file and line."""
        o = self.options
        items = []
        for item in caption_file(self.base / o.images, self.base / o.captions,
                                 self.base / o.split_file if o.split_file else None, source=self.name,
                                 per_caption=False):
            if not isinstance(item, Item):
                raise self._fail(f"{item.where}: {item.reason}")
            if not Path(item.image).is_file():
                raise self._fail(f"{item.where}: image {item.meta['image']} is not in {self.base / o.images}")
            items.append(item)
        return items

    def image_set(self, split: str | None = None) -> ImageSet:
        if split is not None:
            raise self._fail("a caption-file dataset has one split (its split_file)")
        o = self.options
        paths, records = [], []
        for item in self._items():
            if o.limit is not None and len(paths) >= o.limit:
                break
            paths.append(item.image)
            records.append({"key": item.meta["image"], "captions": item.meta["captions"]})
        return FileImages(self.name, paths, records, extra={"limit": o.limit})


@register_format("shards")
class ShardDataset(EvalDataset):
    kind = "retrieval"  # until check() has read the options
    @dataclass
    class Options:
        path: str  # a shard spec: folder, brace pattern, or several joined with ::
        kind: str = "retrieval"  # or classification (samples carry cls / json label)
        classnames: str | list[str] | None = None
        templates: str | list[str] | None = None

    def _spec(self) -> str:
        parts = self.options.path.split("::")
        return "::".join(p if Path(p).is_absolute() or "://" in p or p.startswith("pipe:") else str(self.base / p)
                         for p in parts)

    def check(self) -> None:
        self.kind = self.options.kind
        if self.kind not in ("retrieval", "classification"):
            raise self._fail(f"kind must be retrieval or classification, got {self.kind!r}")
        try:
            shards = expand(self._spec())
            folders = sorted({os.path.dirname(local_path(s.url)) for s in shards if is_local(s.url)})
            manifests = [read_manifest(folder) for folder in folders]
        except ShardSpecError as e:
            raise self._fail(str(e)) from e
        skipped = Counter()
        for manifest in manifests:
            skipped.update((manifest or {}).get("skipped") or {})
        self.skipped_when_written = dict(sorted(skipped.items()))
        if self.kind == "classification":
            self._prompts(None, None)
            labels = [label for s in shards for label in wds_layout.scan_labels(Path(s.url))]
            self._check_labels(labels, self.options.path)

    def image_set(self, split: str | None = None) -> ImageSet:
        if split is not None:
            raise self._fail("a shard dataset has one split (its shard spec)")
        if self.kind == "classification":
            def record(batch, i):
                return {"key": batch["key"][i], "label": int(batch["label"][i])}
            return ShardImages(self.name, self._spec(), record)

        def record(batch, i):
            meta = batch["meta"][i]
            return {"key": batch["key"][i], "image": meta.get("image"), "caption": batch["caption"][i],
                    "all_captions": meta.get("captions")}
        return ShardImages(self.name, self._spec(), record, finalize=merge_by_image)


@register_format("identity")
class IdentityDataset(EvalDataset):
    kind = "identity"

    @dataclass
    class Options:
        path: str
        query: str = "query"
        gallery: str = "gallery"
        # regex on the file name, group 1 the camera; a name it does not match has no known camera, which only
        # gallery_rule same_camera needs (then every file must match); None: no camera at all
        camera: str | None = r"^(\d+)_"
        # text queries: a file of "<person>/<file>,<caption>" lines, or "attributes": each query image's
        # pseudo-caption read off it (vlp/data/attributes.py; what vlp shards identities --captions attributes stores
        # as txt)
        captions: str | None = None

    def _listing(self, part: str) -> list[tuple[str, Path]]:
        """(person, image path) of every image of a part."""
        root = self._exists(self.base / self.options.path / part, f"{part} folder")
        return [(person, path) for _, person, path in self._grouped_images(root, "person")]

    def _camera(self, filename: str) -> str | None:
        if self.options.camera is None:
            return None
        found = re.search(self.options.camera, filename)
        return found.group(1) if found and found.groups() else None

    def check(self) -> None:
        if self.options.camera is not None:
            try:
                re.compile(self.options.camera)
            except re.error as e:
                raise self._fail(f"camera: {self.options.camera!r} is not a regular expression ({e})") from None
        for part in (self.options.query, self.options.gallery):
            self._listing(part)
        if self.options.captions:
            self.text_queries()

    def check_cameras(self, rule: str) -> None:
        """Every file's camera must be known (gallery_rule same_camera): the first name the pattern does not give a
        camera for is an error saying how to set the pattern or choose the rule that needs none."""
        how = ("set camera: in the dataset entry to a regular expression whose group 1 is the camera in the file "
               "name, or use gallery_rule: same_image, which needs no camera")
        if self.options.camera is None:
            raise self._fail(f"gallery_rule {rule} needs each image's camera, but camera: is null; {how}")
        for part in (self.options.query, self.options.gallery):
            for _, path in self._listing(part):
                if self._camera(path.name) is None:
                    raise self._fail(f"gallery_rule {rule} needs each image's camera, but the camera pattern "
                                     f"{self.options.camera!r} finds none in {path}; {how}")

    def text_queries(self) -> list[tuple[str, str]]:
        """(person, caption) for every line of the captions file (Flickr8k's ``image,caption`` layout, the image
        given as ``<person>/<file>``), or of every query image with ``captions: attributes``."""
        if not self.options.captions:
            return []
        if self.options.captions == "attributes":
            from vlp.data.attributes import caption_image

            return [(person, caption_image(path, f"{person}/{path.name}")[0][0])
                    for person, path in self._listing(self.options.query)]
        path = self._exists(self.base / self.options.captions, "caption file")
        queries = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or (lineno == 1 and line.replace(" ", "").lower().startswith("image,caption")):
                continue
            image, comma, caption = line.partition(",")
            person = image.strip().split("/")[0]
            if not comma or not caption.strip() or "/" not in image:
                raise self._fail(f"{path}:{lineno}: expected '<person>/<file>,<caption>'")
            queries.append((person, caption.strip()))
        return queries

    def image_set(self, split: str | None = None) -> ImageSet:
        part = {"query": self.options.query, "gallery": self.options.gallery}.get(split or "")
        if part is None:
            raise self._fail(f"an identity dataset has the parts query and gallery, not {split!r}")
        paths, records = [], []
        for person, path in self._listing(part):
            paths.append(str(path))
            records.append({"key": f"{person}/{path.name}", "identity": person, "camera": self._camera(path.name)})
        return FileImages(f"{self.name}/{part}", paths, records, pictures=True,
                          extra={"camera": self.options.camera})
