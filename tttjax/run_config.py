"""Run configs: the one loader every CLI uses (`--config=FILE` and `--config.a.b=v` overrides).

FILE is either Python (it runs as code, as ml_collections config files do) defining
`get_config()` -> ConfigDict, or YAML: a run's own `args.yaml`, or a moshi-finetune / TTT-Moshi
`TrainArgs` YAML, whose keys are mapped onto ours (`TRAIN_ARGS_RENAMED`, `TRAIN_ARGS_FIXED`);
keys a YAML does not set keep configs/base.py's values. An override's text (and a YAML string)
is read as the type of the key it replaces (str fields take the text as it is; bool true/false;
int/float numbers; None where the field allows it; anything else YAML). Unknown keys fail with
the nearest known key.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import logging
import re
from pathlib import Path

import ml_collections
import yaml

from configs import base

log = logging.getLogger(__name__)

YAML_SUFFIXES = (".yaml", ".yml")

# moshi-finetune / TTT-Moshi TrainArgs keys spelled differently here: key -> (our key, value -> our value).
TRAIN_ARGS_RENAMED = {
    "max_norm": ("optim.max_norm", None),
    "gradient_checkpointing": ("remat", lambda on: "full" if on else "none"),
    "ttt.weight_lr_multiplier": ("optim.ttt_lr_multiplier", None),
    "ttt.alpha_lr_multiplier": ("optim.gate_lr_multiplier", None),
}
# TrainArgs keys with no counterpart here: accepted only with the values that mean what tttjax does.
TRAIN_ARGS_FIXED = {
    "lora.ft_embed": ((False, None), "tttjax does not train the embeddings with LoRA; use full_finetuning"),
    "overwrite_run_dir": ((False, None), "tttjax never overwrites a run; choose a new run_dir"),
    "wandb.key": (("", None), "tttjax does not read API keys from configs; use `wandb login` or WANDB_API_KEY"),
}
# TrainArgs keys that training does not use (it reads prepared codes): accepted, with a note.
TRAIN_ARGS_UNUSED = {
    "moshi_paths.mimi_path": "the codec is used by python -m tttjax.data.prepare --mimi_weight, not by training",
    "moshi_paths.tokenizer_path": "the tokenizer is used by python -m tttjax.data.prepare --tokenizer, not by training",
}
# Spellings of a value that other tools use for the same setting: key -> {text: our value}.
VALUE_ALIASES = {"checkpoint.resume": {"true": "auto", "false": "never"}}


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
    """The config of a Python config file (`get_config()`) or a YAML file (see `load_yaml_file`)."""
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--config={spec}: no such file")
    if path.suffix in YAML_SUFFIXES:
        return load_yaml_file(path)
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


def _parse(text: str, current, where: str):
    """`text` as the type of `current`; `where` (e.g. "--config.a.b=v") names it in errors."""
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{where}: expected true or false")
    if isinstance(current, str):
        return text
    if text.lower() in ("none", "null"):
        return None
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{where}: expected a number") from None
    return yaml.safe_load(text)


def _unknown(key: str, parent, leaf: str, prefix: str) -> ConfigError:
    keys = list(parent.keys()) if isinstance(parent, ml_collections.ConfigDict) else []
    close = difflib.get_close_matches(leaf, keys, n=1)
    hint = f"; did you mean {key.rpartition('.')[0] + '.' if '.' in key else ''}{close[0]}?" if close else ""
    return ConfigError(f"{prefix}{key}: no such key{hint}")


def _parent(config: ml_collections.ConfigDict, key: str, prefix: str) -> tuple[ml_collections.ConfigDict, str]:
    """(the ConfigDict holding dotted `key`, its leaf name); unknown keys fail naming `prefix + key`."""
    *parents, leaf = key.split(".")
    target = config
    for i, part in enumerate(parents):
        if not isinstance(target, ml_collections.ConfigDict) or part not in target:
            raise _unknown(".".join(parents[:i + 1]), target, part, prefix)
        target = target[part]
    if not isinstance(target, ml_collections.ConfigDict) or leaf not in target:
        raise _unknown(key, target, leaf, prefix)
    return target, leaf


def _set(target: ml_collections.ConfigDict, leaf: str, value, key: str, where: str) -> None:
    aliases = VALUE_ALIASES.get(key, {})
    value = aliases.get(str(value).lower(), value)
    try:
        target[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {' '.join(str(e).split())}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[tuple[str, str]]) -> None:
    for key, text in overrides:
        target, leaf = _parent(config, key, "--config.")
        where = f"--config.{key}={text}"
        _set(target, leaf, _parse(text, target[leaf], where), key, where)


# -- YAML files ------------------------------------------------------------------------------------
def _yaml_value(value, current, where: str):
    """A YAML value as the type of the key it sets (YAML 1.1 reads `2e-6` as a string; null = "")."""
    if isinstance(value, str):
        return _parse(value, current, where)
    if isinstance(current, str) and not isinstance(value, (dict, list)):
        return "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _leaves(data: dict, config, prefix: str = ""):
    """(dotted key, value) of a YAML mapping, descending where the config has a sub-ConfigDict."""
    for name, value in data.items():
        key = f"{prefix}{name}"
        below = config.get(name) if isinstance(config, ml_collections.ConfigDict) else None
        if isinstance(value, dict) and (isinstance(below, ml_collections.ConfigDict) or below is None):
            yield from _leaves(value, below, f"{key}.")
        else:
            yield key, value


def load_yaml_file(path: Path) -> ml_collections.ConfigDict:
    """configs/base.py's config with the keys of a YAML file set: our own keys (a run's args.yaml)
    and moshi-finetune / TTT-Moshi TrainArgs keys, mapped onto ours."""
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config={path}: invalid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config={path}: expected a mapping of keys, got {type(data).__name__}")
    config = base.get_config()
    if data.get("lora", ...) is None:  # TrainArgs: `lora: null` = no LoRA
        data = {**data, "lora": {"enable": False}}
    do_eval, hub_id = True, ""
    for key, value in _leaves(data, config):
        where = f"{path}: {key}={value}"
        if key in TRAIN_ARGS_FIXED:
            accepted, why = TRAIN_ARGS_FIXED[key]
            if value not in accepted:
                raise ConfigError(f"{where}: not supported ({why})")
            continue
        if key in TRAIN_ARGS_UNUSED:
            if value:
                log.warning("note: %s: %s is not used (%s)", path, key, TRAIN_ARGS_UNUSED[key])
            continue
        if key == "do_eval":
            do_eval = bool(value)
            continue
        if key == "moshi_paths.hf_repo_id":
            hub_id = value or ""
            continue
        if key in TRAIN_ARGS_RENAMED:
            key, convert = TRAIN_ARGS_RENAMED[key]
            value = convert(value) if convert else value
        target, leaf = _parent(config, key, f"{path}: ")
        _set(target, leaf, _yaml_value(value, target[leaf], where), key, where)
    if hub_id and not config.moshi_paths.moshi_path:
        raise ConfigError(f"{path}: moshi_paths.hf_repo_id={hub_id}: hub ids need a local path; download the "
                          f"repo and set moshi_paths.moshi_path (model.safetensors) and moshi_paths.config_path")
    if not do_eval:
        config.eval_freq = 0
    return config


# -- key listing (--help) -------------------------------------------------------------------------
def base_key_comments() -> dict[str, str]:
    """The one-line comment of each key of configs/base.py, by dotted key."""
    pattern = re.compile(r"^\s+c\.([\w.]+) = .*?  # (.*)$")
    return {m[1]: m[2] for m in map(pattern.match, inspect.getsource(base).splitlines()) if m}


def describe_keys(config: ml_collections.ConfigDict) -> str:
    """Every key of `config` with its value and its configs/base.py comment, one per line."""
    comments = base_key_comments()
    rows = []

    def walk(node, prefix):
        for name in sorted(node.keys()):
            key, value = f"{prefix}{name}", node[name]
            if isinstance(value, ml_collections.ConfigDict):
                if key in comments:
                    rows.append((f"{key}.*", "", comments[key]))
                walk(value, f"{key}.")
            else:
                rows.append((key, repr(value), comments.get(key, "")))

    walk(config, "")
    lines = [f"{key} = {value}" if value else key for key, value, _ in rows]
    width = min(max(map(len, lines)), 40)
    return "\n".join(f"{line:<{width}}  # {comment}" if comment else line
                     for line, (_, _, comment) in zip(lines, rows))


def load(spec: str, overrides: list[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
    """The config of file `spec` with `overrides` applied, locked (no key can be added by mistake)."""
    config = load_config_file(spec)
    apply_overrides(config, list(overrides))
    config.lock()
    return config
