"""The one config reader of every CLI: `--config=FILE` and `--config.a.b=v` overrides.

FILE is Python (it runs as code, as ml_collections config files do) defining `get_config()` ->
ConfigDict, or YAML: a run's own `args.yaml`, or a moshi-finetune / TTT-Moshi `TrainArgs` YAML,
whose keys are mapped onto ours (`TRAIN_ARGS_RENAMED`, `TRAIN_ARGS_FIXED`). Whatever the form, the
keys it sets are laid over the current defaults (tttjax/config/schema.py), so a file written
before a key existed still loads, and the result is validated key by key (`schema.validate`).
An override's text (and a YAML string) is read as the type of the key it replaces (str fields
take the text as it is; bool true/false; int/float numbers; None where the field allows it;
anything else YAML). Unknown keys fail with the key path that exists; duplicate YAML keys fail
with both lines.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
from pathlib import Path

import ml_collections
import yaml

from tttjax import rundir
from tttjax.config import schema
from tttjax.errors import ConfigError

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


def suggest_key(name: str) -> str | None:
    """The existing key path a misspelt or misplaced `name` most likely means: a key whose last part
    is `name` (`lr` -> `optim.lr`), else the closest dotted path or last part."""
    paths = schema.key_paths()
    leaf = name.rpartition(".")[2]
    same_leaf = [p for p in paths if p.rpartition(".")[2] == leaf and p != name]
    if same_leaf:
        return same_leaf[0]
    close = difflib.get_close_matches(name, paths, n=1, cutoff=0.7)
    if close:
        return close[0]
    by_leaf = {p.rpartition(".")[2]: p for p in paths}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.7)
    return by_leaf[close[0]] if close else None


def _unknown(key: str, where: str) -> ConfigError:
    hint = suggest_key(key)
    return ConfigError(f"{where}{key}: no such key" + (f"; did you mean {hint}?" if hint else ""))


def _parent(config: ml_collections.ConfigDict, key: str, where: str) -> tuple[ml_collections.ConfigDict, str]:
    """(the ConfigDict holding dotted `key` (or the key an alias names), its leaf name); unknown keys
    fail naming `where + key`."""
    *parents, leaf = schema.ALIASES.get(key, key).split(".")
    target = config
    for part in parents:
        if not isinstance(target, ml_collections.ConfigDict) or part not in target:
            raise _unknown(key, where)
        target = target[part]
    if not isinstance(target, ml_collections.ConfigDict) or leaf not in target \
            or isinstance(target[leaf], ml_collections.ConfigDict):
        raise _unknown(key, where)
    return target, leaf


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


def _set(config: ml_collections.ConfigDict, key: str, value, *, prefix: str, where: str) -> None:
    """config[key] = value; an unknown key fails naming `prefix + key`, a bad value naming `where`."""
    target, leaf = _parent(config, key, prefix)
    value = VALUE_ALIASES.get(key, {}).get(str(value).lower(), value)
    if isinstance(target[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    try:
        target[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {' '.join(str(e).split())}") from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[tuple[str, str]]) -> None:
    for key, text in overrides:
        target, leaf = _parent(config, key, "--config.")
        where = f"--config.{key}={text}"
        _set(config, key, _parse(text, target[leaf], where), prefix="--config.", where=where)


def _config_leaves(node: ml_collections.ConfigDict, prefix: str = ""):
    for name in node.keys():
        value = node[name]
        if isinstance(value, ml_collections.ConfigDict):
            yield from _config_leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def _load_python(path: Path) -> ml_collections.ConfigDict:
    """The keys a Python config file's `get_config()` sets, laid over the defaults."""
    try:
        module_spec = importlib.util.spec_from_file_location(f"_tttjax_config_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        loaded = module.get_config()
    except Exception as e:  # the user's file: any error is a config error
        raise ConfigError(f"--config={path}: could not load it ({type(e).__name__}: {e})") from None
    if not isinstance(loaded, ml_collections.ConfigDict):
        raise ConfigError(f"--config={path}: get_config() returned {type(loaded).__name__}, not a ConfigDict")
    config = schema.default_config()
    for key, value in _config_leaves(loaded):
        _set(config, key, value, prefix=f"{path}: ", where=f"{path}: {key}={value!r}")
    return config


# -- YAML files ------------------------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key that a mapping repeats (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{self.name}: key {key!r} appears twice (lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1})")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _yaml_value(value, current, where: str):
    """A YAML value as the type of the key it sets (YAML 1.1 reads `2e-6` as a string; null = "")."""
    if isinstance(value, str):
        return _parse(value, current, where)
    if isinstance(current, str) and not isinstance(value, (dict, list)):
        return "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return value


def _yaml_leaves(data: dict, config, prefix: str = ""):
    """(dotted key, value) of a YAML mapping, descending where the config has a sub-ConfigDict."""
    for name, value in data.items():
        key = f"{prefix}{name}"
        below = config.get(name) if isinstance(config, ml_collections.ConfigDict) else None
        if isinstance(value, dict) and (isinstance(below, ml_collections.ConfigDict) or below is None):
            yield from _yaml_leaves(value, below, f"{key}.")
        else:
            yield key, value


def _load_yaml(path: Path) -> ml_collections.ConfigDict:
    """The defaults with the keys of a YAML file set: our own keys (a run's args.yaml) and
    moshi-finetune / TTT-Moshi TrainArgs keys, mapped onto ours."""
    try:
        with open(path) as stream:  # the loader names the file in its errors
            data = yaml.load(stream, Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config={path}: invalid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config={path}: expected a mapping of keys, got {type(data).__name__}")
    config = schema.default_config()
    if data.get("lora", ...) is None:  # TrainArgs: `lora: null` = no LoRA
        data = {**data, "lora": {"enable": False}}
    do_eval, hub_id = True, ""
    for key, value in _yaml_leaves(data, config):
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
        _set(config, key, _yaml_value(value, target[leaf], where), prefix=f"{path}: ", where=where)
    if hub_id and not config.moshi_paths.moshi_path:
        raise ConfigError(f"{path}: moshi_paths.hf_repo_id={hub_id}: hub ids need a local path; download the "
                          f"repo and set moshi_paths.moshi_path (model.safetensors) and moshi_paths.config_path")
    if not do_eval:
        config.evals.standard.freq = 0
    return config


def _read(path: Path) -> ml_collections.ConfigDict:
    if not path.is_file():
        raise ConfigError(f"--config={path}: no such file")
    return _load_yaml(path) if path.suffix in YAML_SUFFIXES else _load_python(path)


def load(spec: str, overrides: list[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
    """The config of file `spec` over the defaults, with `overrides` applied, validated and locked
    (no key can be added by mistake)."""
    config = _read(Path(spec))
    apply_overrides(config, list(overrides))
    schema.validate(config, source=f"{spec}: " if not overrides else "")
    config.lock()
    return config


def read_step_config(step: Path) -> ml_collections.ConfigDict:
    """The config of the run a step dir belongs to: its args.yaml over the current defaults (a run
    saved before a key existed gets that key's default)."""
    args = rundir.run_dir_of(step) / rundir.ARGS_FILE
    if not args.is_file():
        raise FileNotFoundError(f"{args} not found: {step} is not a step dir of a tttjax run")
    config = _load_yaml(args)
    schema.validate(config, source=f"{args}: ")
    config.lock()
    return config


def help_text(spec: str | None, overrides) -> str:
    """Every key of `spec` (default: the defaults) with its value and comment."""
    config = schema.default_config() if spec is None else load(spec, overrides)
    source = "the defaults (tttjax/config/schema.py)" if spec is None else spec
    return f"config keys of {source} (--config.KEY=VALUE overrides any):\n{schema.describe(config)}"
