"""Typed experiment configs: one YAML file = one complete experiment.

``load_experiment(path, overrides, smoke)`` reads the file, applies its ``smoke:`` section when asked (a few
steps on tiny data, so the test suite can run every shipped config on a CPU), then ``--set a.b=c`` overrides
(values parsed as YAML), and builds the dataclasses below. Unknown keys and wrongly typed values are errors
that name the file and the dotted key. ``to_yaml`` gives the resolved config that is saved in the run folder.
Each component receives only its own section.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class SourceConfig:
    shards: str  # a shard spec (brace expansion, '::' joins, pipe:, fsspec URLs) or "builtin:digits"
    weight: float = 1.0
    # label data: a prompt registry entry (eval/prompts/<name>.yaml, the one the evaluation suites use) whose class
    # names and templates turn each sample's label into text, one template drawn per sample and step; kind "label"
    prompts: Optional[str] = None


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    batch_size: int = 256  # per rank and per micro-step
    workers: int = 2
    shuffle_buffer: int = 2000
    resampled: bool = False
    samples_per_epoch: Optional[int] = None  # resampled or mixed sources only
    caption: str = "first"  # "random": one of json["captions"] per step
    captions_per_sample: int = 1  # k > 1 with caption "random": k captions per image and step (objectives average)
    drop_last: bool = False  # drop each worker's short last batch (always on with several ranks)
    scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area range, as open_clip's default
    # RandomResizedCrop aspect range (width / height), as open_clip's default. A crop of another shape than the
    # model's square input is resized to it (squashed): tall pedestrian crops (48x128) keep head and feet with
    # [0.375, 0.375]; at the default 3/4..4/3 every crop of them is the central 48x64 (torchvision's fallback)
    ratio: tuple[float, float] = (0.75, 4 / 3)
    draft: bool = True
    hflip: bool = False  # random horizontal flip (data augmentation)
    in_memory: bool = False  # decode one source's samples once and keep them in RAM (vlp/data/memory.py)
    # in memory only: [[epoch, size], ...], crops of that size from that epoch on (the last size = the model's)
    size_schedule: Optional[list[list[int]]] = None
    # each image's brightness, contrast and saturation scaled by factors drawn from [1-j, 1+j]
    # (hue kept: captions name colours); 0 = off
    color_jitter: float = 0.0
    # each caption token other than the first and the end-of-text token dropped with this
    # probability (the caption closes up); 0 = off
    token_drop: float = 0.0
    # a square of this side (pixels) of each image filled with the normalisation mean; 0 = off
    cutout: int = 0
    # [P, K]: batches of P identities x K images each (json identity), P >= 2 and P*K the batch size:
    # identity-level objectives need positives in the batch (in memory: vlp/data/memory.py, identity_order;
    # streamed: vlp/data/stream.py, identity_groups)
    identity_batches: Optional[list[int]] = None
    # slot -> its values, e.g. {upper_color: [black, white, ...]}: json["attributes"] become the batch's
    # ``attributes`` (N, slots) int64 tensor, -1 where a slot is absent or its value is not listed
    attributes: dict = field(default_factory=dict)


@dataclass
class ModelConfig:
    name: str = "vlp-tiny-32"  # any open_clip config, or vlp's own (vlp/models/configs)
    pretrained: Optional[str] = None  # an open_clip tag or a local weights file
    init_logit_scale: Optional[float] = None  # log-space; open_clip's default is log(1/0.07)
    init_logit_bias: Optional[float] = None  # SigLIP: -10
    # the eval transform's resize, where it should differ from the model's own: "squash" resizes a whole non-square
    # image to the square input (pedestrian crops keep head and feet; pair it with data.ratio), "shortest" crops
    # the centre. Saved with the run, so vlp eval of the run uses it
    resize_mode: Optional[str] = None
    logit_scale_max: float = 100.0
    grad_checkpointing: bool = False
    # torch.compile: true = the whole model; "visual" or "text" = that tower only (compiled in place, so
    # checkpoints keep plain names). On 2 CPU cores neither tower compiled measurably faster than eager steps
    # (benchmarks/RESULTS.md).
    compile: Union[bool, str] = False
    # image tower and images in channels-last memory order, the layout convolutions prefer on GPUs (and oneDNN on
    # CPU; on the 2-core CPU no clear difference for vlp-r10t-32); in a ViT only the patch embedding is a convolution.
    # Not with train.fsdp (FSDP shards only contiguous parameters).
    channels_last: bool = False
    # compute padded convolutions of the image tower without the kernel taps that read only padding at the
    # input size each is called with (vlp/models/trim.py). Exact, and the weights keep their shapes. For timm's
    # resnet10t at 32 px (last feature maps 2x2 and 1x1), the image tower's forward + backward on the 2-core CPU
    # took 0.17-0.22 s instead of 0.39 s per batch of 128. Towers without padded convolutions (ViTs) are unchanged.
    trim_dead_taps: bool = True
    # run open_clip's text tower over each caption's tokens up to its end-of-text token, packed, instead of the
    # padded context (vlp/models/text.py): the same result, since it attends causally and pools that token.
    # Only for open_clip's default CLIP text tower, and not with model.compile: true / text.
    pack_text: bool = True
    # named extra parts (vlp/models/parts.py): {name: {type: text_prefix | linear_head, ...options}}
    parts: dict = field(default_factory=dict)


@dataclass
class ObjectiveConfig:
    name: str = "clip"
    weight: float = 1.0
    options: dict = field(default_factory=dict)


@dataclass
class ParamRule:
    pattern: str  # regular expression, full match on the parameter name
    lr_scale: Optional[float] = None
    weight_decay: Optional[float] = None
    freeze: bool = False
    max_dims: Optional[int] = None  # only parameters of at most this many dimensions (1: biases, norm scales)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    clip_grad: Optional[float] = None
    # torch's fused AdamW kernel (CPU and CUDA): the same update in one pass over each tensor. On the 2-core CPU it
    # stepped vlp-r10t-32 (12M parameters) in 14 ms against 95 ms for the default implementation open_clip uses.
    fused: bool = True
    # Applied in order, later rules override earlier ones. The default keeps weight decay off every tensor of
    # fewer than 2 dimensions (biases, norm and BatchNorm scales, the logit scale and bias), as open_clip does,
    # and off the positional/class embeddings.
    rules: list[ParamRule] = field(default_factory=lambda: [
        ParamRule(r".*", weight_decay=0.0, max_dims=1),
        ParamRule(r".*positional_embedding", weight_decay=0.0)])


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: Optional[int] = None
    accum_steps: int = 1  # micro-batches per step; the contrastive batch spans all of them
    precision: str = "fp32"  # fp32 | bf16 | fp16
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    checkpoint_every: Optional[int] = None  # steps; a checkpoint is also written at the end
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (latest checkpoint of the run, if any) | never | a checkpoint folder
    fsdp: bool = False
    local_loss: bool = False
    threads: Optional[int] = None  # torch threads of each process on CPU; None keeps torch's default
    ema: Optional[float] = None  # decay per step of an average of the weights (e.g. 0.995); see vlp/train/ema.py
    # seconds a process may take after SIGTERM to finish its step, and again to write its checkpoint, before it
    # exits without one: a rank waiting on a peer that is gone never gets there. Well below torchrun's
    # --shutdown-timeout (30 s by default), after which torchrun kills it.
    stop_grace: float = 10.0


@dataclass
class EvalConfig:
    suite: Optional[str] = None  # a suite name (eval/suites) or file
    every: Optional[int] = None  # steps; the suite always runs at the end when set
    batch_size: int = 256


@dataclass
class FilteringConfig:
    """Filter a pool before training (vlp/filtering, docs/filtering.md): score it with a filter network, select by
    rules, reshard the kept samples; the run then trains on them. Each stage is skipped where its output is whole."""
    pool: Optional[str] = None  # shard spec of the pool; None: no filtering
    model: Optional[str] = None  # the filter network as vlp eval takes it (run folder, NAME:TAG, NAME:/weights)
    model_config: Optional[str] = None  # or an experiment config trained first, in <work>/filter-network
    keep: list[str] = field(default_factory=list)  # vlp filter rules, all must hold (e.g. score_top=0.3)
    dedup_suite: Optional[str] = None  # evaluation suite whose images' near-duplicates a rule eval_dup<t removes
    work: Optional[str] = None  # scores/, selection/, kept/ (default: <run folder>/filtering)
    batch_size: int = 256
    workers: int = 1
    exact_decode: bool = False
    samples_per_shard: int = 1000


@dataclass
class Experiment:
    name: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: list[ObjectiveConfig] = field(default_factory=lambda: [ObjectiveConfig()])
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    filtering: FilteringConfig = field(default_factory=FilteringConfig)
    out: str = "runs"  # the run folder is <out>/<name>


# -- building dataclasses from plain data ---------------------------------------------------------------------
def _build(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for arg in args[:-1]:  # the first type the value fits; the last one's error is the one reported
            try:
                return _build(arg, value, key)
            except ConfigError:
                pass
        return _build(args[-1], value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key or 'config'}: expected a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"{_join(key, unknown[0])}: unknown key (known: {', '.join(sorted(names))})")
        kwargs = {k: _build(hints[k], v, _join(key, k)) for k, v in value.items()}
        missing = [f.name for f in dataclasses.fields(tp) if f.name not in kwargs
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{_join(key, missing[0])}: required key is missing")
        return tp(**kwargs)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            if origin is list and dataclasses.is_dataclass(typing.get_args(tp)[0]) and isinstance(value, dict):
                value = [value]
            else:
                raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_build(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        return [_build(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        return float(value)  # PyYAML (YAML 1.1) reads 1e-3, without a dot, as a string
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for i, part in enumerate(parents):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(parents[:i + 1])} is not a section")
        node = nxt
    node[leaf] = value


def experiment_from_dict(data: dict, overrides: list[str] = (), smoke: bool = False,
                         origin: str = "config") -> Experiment:
    data = copy.deepcopy(data)
    smoke_section = data.pop("smoke", None)
    if smoke:
        if not smoke_section:
            raise ConfigError(f"{origin}: no 'smoke' section, so it cannot run in smoke mode")
        for dotted, value in _flatten(smoke_section):
            _set_dotted(data, dotted, value)
    for item in overrides:
        dotted, eq, raw = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:  # e.g. a !!python tag, which safe loading refuses
            reason = str(e).splitlines()[0]
            raise ConfigError(f"--set {item!r}: not a plain YAML value ({reason})") from None
        _set_dotted(data, dotted.strip(), value)
    try:
        exp = _build(Experiment, data, "")
        validate(exp)
    except ConfigError as e:
        raise ConfigError(f"{origin}: {e}") from None
    except ValueError as e:  # the components' own checks name the key
        raise ConfigError(f"{origin}: {e}") from None
    return exp


_CHOICES = {("schedule", "name"): ("cosine", "linear", "constant"), ("train", "precision"): ("fp32", "bf16", "fp16"),
            ("train", "device"): ("auto", "cpu", "cuda"), ("model", "compile"): (True, False, "visual", "text"),
            ("model", "resize_mode"): (None, "shortest", "squash")}


def validate(exp: Experiment) -> None:
    """The checks a run would otherwise make at its first step (or never), made when the config loads: each error
    names the dotted key. Components keep their own checks for callers that build them in code."""
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(exp, section), key)
        if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
            raise ConfigError(f"{section}.{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
    t = exp.train
    for key, value, low in (("train.accum_steps", t.accum_steps, 1), ("train.log_every", t.log_every, 1),
                            ("train.epochs", t.epochs, 1), ("train.max_steps", t.max_steps, 1),
                            ("train.threads", t.threads, 1), ("train.checkpoint_every", t.checkpoint_every, 1),
                            ("train.keep_checkpoints", t.keep_checkpoints, 1),
                            ("data.batch_size", exp.data.batch_size, 1),
                            ("data.workers", exp.data.workers, 0), ("eval.every", exp.eval.every, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{key}: {value} (needs {low} or more{', or null' if key != 'data.batch_size' else ''})")
    if t.stop_grace <= 0:
        raise ConfigError(f"train.stop_grace: {t.stop_grace} (seconds, more than 0)")
    if t.ema is not None and not 0.0 < t.ema < 1.0:
        raise ConfigError(f"train.ema: {t.ema} is not a decay in (0, 1) (e.g. 0.995), or null for none")
    if not exp.objectives:
        raise ConfigError("objectives: no objective given")
    # the components' own checks, imported here: vlp.config itself stays free of torch (load_model_config, the CLI)
    from vlp.data.augment import check_augment
    from vlp.data.batch import check_attribute_vocabulary
    from vlp.data.memory import check_identity_batches, check_size_schedule
    from vlp.data.stream import check_caption_options
    from vlp.models import model_image_size
    from vlp.models.parts import check_part
    from vlp.objectives import build_objective

    d = exp.data
    check_caption_options(d.caption, d.captions_per_sample, prefix="data.")
    size = None
    if not exp.model.name.startswith(("hf-hub:", "local-dir:")):  # open_clip schemas whose config is remote
        try:
            size = model_image_size(exp.model.name)
        except ValueError as e:
            raise ConfigError(f"model.name: {e}") from None
    check_augment(d.color_jitter, d.token_drop, d.cutout, size)
    if not (0 < d.ratio[0] <= d.ratio[1]):
        raise ConfigError(f"data.ratio: {list(d.ratio)} needs 0 < low <= high (width / height)")
    if d.identity_batches is not None:
        check_identity_batches(d.identity_batches, d.batch_size, "data.")
        if not d.in_memory and (d.resampled or len(d.train) > 1):
            raise ConfigError("data.identity_batches: streams in epochs from one source (not data.resampled, not "
                              "several sources)")
        if not d.in_memory and exp.train.max_steps is None:
            raise ConfigError("data.identity_batches: streamed identity batches make epochs of unknown length: set "
                              "train.max_steps")
    check_attribute_vocabulary(d.attributes, "data.attributes")
    if d.size_schedule and size is not None:
        check_size_schedule(d.size_schedule, size)
    for i, source in enumerate(d.train):
        if source.prompts is not None:
            label_prompts(source.prompts, f"data.train[{i}].prompts")
    for name, options in exp.model.parts.items():
        check_part(name, options)
    for i, o in enumerate(exp.objectives):
        build_objective(o.name, o.options, key=f"objectives[{i}]")
    _check_attribute_counts(exp)
    _validate_filtering(exp)


def _check_attribute_counts(exp: Experiment) -> None:
    """An attribute head and the attributes objective count each slot's values as data.attributes lists them."""
    counts = [len(values) for values in exp.data.attributes.values()]
    places = [(f"model.parts.{name}.classes", options.get("classes")) for name, options in exp.model.parts.items()
              if isinstance(options, dict) and options.get("type") == "attribute_head"]
    places += [(f"objectives[{i}].options.classes", o.options.get("classes")) for i, o in enumerate(exp.objectives)
               if o.name == "attributes"]
    for key, classes in places:
        if classes != counts:
            raise ConfigError(f"{key}: {classes} values per slot, but data.attributes lists {counts}"
                              f"{' (no slot: set data.attributes)' if not counts else ''}")


def _validate_filtering(exp: Experiment) -> None:
    f = exp.filtering
    if f.pool is None:
        return
    if (f.model is None) == (f.model_config is None):
        raise ConfigError("filtering: give the filter network as filtering.model or filtering.model_config (one)")
    if not f.keep:
        raise ConfigError("filtering.keep: no rule given (e.g. [score_top=0.3])")
    from vlp.filtering.select import parse_rule

    for i, rule in enumerate(f.keep):
        try:
            parse_rule(rule)
        except ValueError as e:
            raise ConfigError(f"filtering.keep[{i}]: {e}") from None
    if f.model_config is not None and not Path(f.model_config).exists():
        raise ConfigError(f"filtering.model_config: {f.model_config} does not exist")


def _flatten(section: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Smoke sections may be nested or use dotted keys; lists and leaf values replace what they point at."""
    items = []
    for k, v in section.items():
        key = _join(prefix, k)
        if isinstance(v, dict) and k not in ("options",):
            items.extend(_flatten(v, key))
        else:
            items.append((key, v))
    return items


def load_experiment(path: str | Path, overrides: list[str] = (), smoke: bool = False) -> Experiment:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    data.setdefault("name", path.stem)
    return experiment_from_dict(data, overrides, smoke, origin=str(path))


def label_prompts(name: str, key: str):
    """The :class:`vlp.data.preprocess.LabelPrompts` of a prompt registry entry; errors name ``key``."""
    from vlp.data.preprocess import LabelPrompts
    from vlp.eval.prompts import PromptError, registry_list

    try:
        classnames, templates = registry_list(name, "classnames"), registry_list(name, "templates")
    except PromptError as e:
        raise ConfigError(f"{key}: {e}") from None
    if not classnames or not templates:
        raise ConfigError(f"{key}: prompt registry entry {name!r} lacks classnames or templates")
    return LabelPrompts(name, tuple(classnames), tuple(templates))


def load_model_config(path: str | Path) -> ModelConfig:
    """The ``model:`` section of a resolved config (a run folder's or a checkpoint's ``config.yaml``): all that is
    needed to rebuild the run's model."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the run's config ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConfigError(f"{path}: no model section")
    try:
        return _build(ModelConfig, data["model"], "model")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_yaml(exp: Experiment) -> str:
    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, list):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return yaml.safe_dump(plain(dataclasses.asdict(exp)), sort_keys=False)
