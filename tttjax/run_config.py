"""Run configs: the one loader every CLI uses (`--config=configs/x.py` and `--config.a.b=v` overrides).

A config file is Python (it runs as code, as ml_collections config files do) defining
`get_config()` -> ConfigDict. An override's text is read as the type of the key it replaces
(str fields take the text as it is; bool true/false; int/float numbers; None where the field
allows it; anything else YAML). Unknown keys fail with the nearest known key.
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

import ml_collections
import yaml


class ConfigError(ValueError):
    """A config file or an override that cannot be used; the message names it."""


def split_config_args(argv: list[str]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """(config file, [(dotted key, text)], the other arguments) of `--config=F --config.a.b=v ...`
    (also `--config F` and `--config.a.b v`)."""
    spec, overrides, rest = None, [], []
    items = list(argv)
    while items:
        item = items.pop(0)
        name, sep, value = item.partition("=")
        if name == "--config" or name.startswith("--config."):
            if not sep:
                if not items:
                    raise ConfigError(f"{name} needs a value")
                value = items.pop(0)
            if name == "--config":
                spec = value
            else:
                overrides.append((name[len("--config."):], value))
        else:
            rest.append(item)
    return spec, overrides, rest


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`get_config()` of a Python config file."""
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--config={spec}: no such file")
    try:
        module_spec = importlib.util.spec_from_file_location(f"_tttjax_config_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        config = module.get_config()
    except Exception as e:  # the user's file: any error is a config error
        raise ConfigError(f"--config={spec}: could not load it ({type(e).__name__}: {e})") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--config={spec}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return config


def _parse(text: str, current, key: str):
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}={text}: expected true or false")
    if isinstance(current, str):
        return text
    if text.lower() in ("none", "null"):
        return None
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--config.{key}={text}: expected an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{key}={text}: expected a number") from None
    return yaml.safe_load(text)


def _unknown(key: str, parent: ml_collections.ConfigDict, leaf: str) -> ConfigError:
    close = difflib.get_close_matches(leaf, list(parent.keys()), n=1)
    hint = f"; did you mean {key.rpartition('.')[0] + '.' if '.' in key else ''}{close[0]}?" if close else ""
    return ConfigError(f"--config.{key}: no such key{hint}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[tuple[str, str]]) -> None:
    for key, text in overrides:
        *parents, leaf = key.split(".")
        target = config
        for i, part in enumerate(parents):
            if not isinstance(target, ml_collections.ConfigDict) or part not in target:
                raise _unknown(".".join(parents[:i + 1]), target, part)
            target = target[part]
        if not isinstance(target, ml_collections.ConfigDict) or leaf not in target:
            raise _unknown(key, target, leaf)
        try:
            target[leaf] = _parse(text, target[leaf], key)
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"--config.{key}={text}: {' '.join(str(e).split())}") from None


def load(spec: str, overrides: list[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
    """The config of file `spec` with `overrides` applied, locked (no key can be added by mistake)."""
    config = load_config_file(spec)
    apply_overrides(config, list(overrides))
    config.lock()
    return config
