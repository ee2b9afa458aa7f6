"""YAML at the edge: parse a job's YAML file into the frozen config dataclasses of ``pipeline``.

Keys are the dataclass field names. Every error names the file and the dotted path of the offending key
(``sweep.sigma_sources[1].resample``), unknown keys get "did you mean" suggestions, and files the config refers to
(weights, dataset roots) must exist before anything starts.

Shorthands: a dataset may be given as its name (``eval_dataset: fashion-mnist``); a Sigma source of a sweep as a
name or as a flat mapping of ``DatasetSpec`` fields plus an optional ``label``; a list field accepts a scalar.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = [
    "ConfigError",
    "build_config",
    "check_files",
    "compress_config_from_yaml",
    "job_parser",
    "load_yaml",
    "parse_overrides",
    "run_job",
    "sweep_config_from_yaml",
]


class ConfigError(ValueError):
    """A config file that cannot be turned into a valid config; the message says where and why."""


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping, with clear errors for a missing file, bad syntax or a non-mapping document."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (cwd {Path.cwd()})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys, got {type(data).__name__}")
    return data


def build_config(cls: type, data: object, where: str, *, shorthands: bool = True):
    """Instantiate dataclass ``cls`` from ``data`` (a mapping), converting every field by its type hint.

    ``shorthands=False`` skips the dataset shorthands of this module (used by those shorthands themselves).
    """
    special = _shorthands().get(cls) if shorthands else None
    if special is not None:
        return special(data, where)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), fields, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {key: _convert(value, hints[key], f"{where}.{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _convert(value: object, hint: object, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _convert(value, options[0], where) if len(options) == 1 else _first_fit(value, options, where)
    if origin is tuple:
        return _convert_tuple(value, args, where)
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return build_config(hint, value, where)
    return _scalar(value, hint, where)


def _first_fit(value, options, where):
    errors = []
    for option in options:
        try:
            return _convert(value, option, where)
        except ConfigError as exc:
            errors.append(str(exc))
    raise ConfigError(errors[0])


def _convert_tuple(value, args, where):
    if not isinstance(value, (list, tuple)):
        value = [value]  # a scalar stands for a one-element list
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
    return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def _scalar(value, hint, where):
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if hint is typing.Any or hint is object:
        return value
    raise ConfigError(f"{where}: unsupported field type {hint!r}")


# --------------------------------------------------------------------------- #
# Shorthands for the dataset-like configs
# --------------------------------------------------------------------------- #
def _dataset_spec(data, where):
    from pipeline.data import DATASET_NAMES, RESAMPLE_MODES, SPLITS, DatasetSpec

    if isinstance(data, str):
        data = {"name": data}
    spec = _plain(DatasetSpec, data, where)
    if spec.name not in DATASET_NAMES:
        raise ConfigError(f"{where}.name: unknown dataset {spec.name!r}; valid: {', '.join(DATASET_NAMES)}")
    if spec.split not in SPLITS:
        raise ConfigError(f"{where}.split: expected one of {', '.join(SPLITS)}, got {spec.split!r}")
    if spec.resample not in RESAMPLE_MODES:
        raise ConfigError(f"{where}.resample: expected one of {', '.join(RESAMPLE_MODES)}, got {spec.resample!r}")
    if spec.image_size is not None and spec.image_size < 1:
        raise ConfigError(f"{where}.image_size: must be >= 1, got {spec.image_size}")
    if spec.name == "imagefolder" and not spec.root:
        raise ConfigError(f"{where}: an imagefolder dataset needs root: DIR")
    return spec


def _sweep_source(data, where):
    from pipeline.sweep import SweepSource

    if isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a dataset name or a mapping, got {data!r}")
    data = dict(data)
    label = data.pop("label", None)
    if "dataset" in data:
        if set(data) != {"dataset"}:
            raise ConfigError(f"{where}: give either dataset: {{...}} or flat dataset keys, not both")
        dataset, dataset_where = data["dataset"], f"{where}.dataset"
    else:
        dataset, dataset_where = data, where
    return SweepSource(_dataset_spec(dataset, dataset_where),
                       label=None if label is None else _scalar(label, str, f"{where}.label"))


def _sigma_source(data, where):
    from pipeline.compress import SigmaSource

    if isinstance(data, str):
        data = {"dataset": data}
    return _plain(SigmaSource, data, where)


def _plain(cls, data, where):
    return build_config(cls, data, where, shorthands=False)


@functools.cache
def _shorthands() -> dict:
    # Imported on first use so that importing this module (and a --help) stays cheap.
    from pipeline.compress import SigmaSource
    from pipeline.data import DatasetSpec
    from pipeline.sweep import SweepSource

    return {DatasetSpec: _dataset_spec, SweepSource: _sweep_source, SigmaSource: _sigma_source}


# --------------------------------------------------------------------------- #
# Files the config refers to
# --------------------------------------------------------------------------- #
def check_files(config, where: str) -> None:
    """Raise :class:`ConfigError` if a weights file or a dataset root named by ``config`` does not exist."""
    weights = getattr(config, "weights", None)
    if weights is not None and not Path(weights).expanduser().is_file():
        raise ConfigError(f"{where}.weights: file {weights} not found (cwd {Path.cwd()})")
    for path, spec in _dataset_specs(config, where):
        if spec.root is not None and "://" not in spec.root and not Path(spec.root).expanduser().exists():
            raise ConfigError(f"{path}.root: directory {spec.root} not found (cwd {Path.cwd()})")


def _dataset_specs(config, where):
    from pipeline.data import DatasetSpec

    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        items = value if isinstance(value, tuple) else (value,)
        for i, item in enumerate(items):
            path = f"{where}.{f.name}" + (f"[{i}]" if isinstance(value, tuple) else "")
            if isinstance(item, DatasetSpec):
                yield path, item
            elif dataclasses.is_dataclass(item) and not isinstance(item, type):
                yield from _dataset_specs(item, path)


# --------------------------------------------------------------------------- #
# Entry points used by the jobs
# --------------------------------------------------------------------------- #
def parse_overrides(items: Sequence[str]) -> dict:
    """``["alphas=[0.8, 1.0]", "output_dir=/tmp/x"]`` -> dict, each value parsed as YAML."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (VALUE in YAML), got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: invalid YAML value {value!r}: {exc}") from None
    return out


def job_parser(prog: str, description: str):
    """The common command line of the jobs: ``--config FILE`` and repeatable ``--set KEY=VALUE``."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="YAML file (see jobs/configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one top-level key of the config (VALUE is YAML), repeatable")
    return parser


def run_job(body: Callable[[], int]) -> int:
    """Run a job body; config errors (and missing files) print one clear line and exit with status 2."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        return body()
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as exc:  # settings refused by the pipeline (ranks, layers, tracking URI)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, EOFError) as exc:  # disk full, read-only, permission denied, broken input files
        from pipeline.preflight import describe_os_error

        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 2


def sweep_config_from_yaml(path: str | os.PathLike, **overrides):
    """A :class:`pipeline.sweep.SweepConfig` from a YAML file (``overrides`` replace keys after parsing)."""
    from pipeline.sweep import SweepConfig

    data = {**load_yaml(path), **{k: v for k, v in overrides.items() if v is not None}}
    config = build_config(SweepConfig, data, f"{path}: sweep")
    check_files(config, f"{path}: sweep")
    return config


def compress_config_from_yaml(path: str | os.PathLike, **overrides):
    """A :class:`pipeline.runner.CompressConfig` from a YAML file."""
    from pipeline.runner import CompressConfig

    data = {**load_yaml(path), **{k: v for k, v in overrides.items() if v is not None}}
    config = build_config(CompressConfig, data, f"{path}: compress")
    check_files(config, f"{path}: compress")
    return config
