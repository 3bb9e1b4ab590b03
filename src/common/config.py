"""One Hydra config for every stage: entry helper, validation, and the run's saved config.

Every stage module has `run(cfg)` (called by tests) and `main = stage_main(run)` (the CLI):
    python -m src.etl.split split.val=0.2

The composed config is validated once, at the stage's start (`stage_main`) or when built (`load_config`):
each key has its default's type in config.yaml, src/common/config_rules.py adds ranges and choices, and
an unknown key is refused with the closest known one. Every problem is listed in one ConfigError.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import hydra
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from loguru import logger
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src.common.config_rules import (
    LEGACY_VARIANT_ARCH,
    NON_NEGATIVE,
    OPEN_MAPS,
    REPLACED_MAPS,
    Rule,
    rule_for,
)
from src.common.errors import ConfigError, UserError
from src.common.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]  # the repository root, where config.yaml lives
CONFIG_NAME = "config"


def load_config(overrides: Sequence[str] = (), config_dir: Path | None = None) -> DictConfig:
    """Compose config.yaml with command-line style overrides, validated (what tests and notebooks use)."""

    defaults = default_config(config_dir)
    overrides, unknown = check_overrides(overrides, defaults)
    unknown = [*repeated_yaml_keys(config_dir), *unknown]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir or ROOT), version_base=None):
        cfg = compose(config_name=CONFIG_NAME, overrides=overrides)
    return validate_config(cfg, defaults, unknown)


def stage_main(run: Callable[[DictConfig], object]) -> Callable[[], None]:
    """Wrap a stage's `run(cfg)` as a Hydra CLI entry point reading config.yaml at the repo root.

    The command line's keys are checked before Hydra parses them (Hydra's own error for an unknown key has
    no suggestion and a traceback hint): unknown ones are held back and reported with every other problem
    of the composed config, which is validated before `run`.
    """

    unknown: list[str] = []

    @hydra.main(config_path=str(ROOT), config_name=CONFIG_NAME, version_base=None)
    @functools.wraps(run)
    def _main(cfg: DictConfig) -> None:
        with _user_errors_as_one_line():
            run(validate_config(cfg, problems=unknown))

    @functools.wraps(run)
    def main() -> None:
        sys.argv[1:], found = check_overrides(sys.argv[1:])
        unknown[:] = [*repeated_yaml_keys(), *found]
        _main()

    return main


@contextlib.contextmanager
def _user_errors_as_one_line():
    """A UserError (a refusal the user fixes) is logged as its message, no traceback, and exits 2."""
    try:
        yield
    except UserError as err:
        logger.error(str(err))
        sys.exit(2)


def default_config(config_dir: Path | None = None) -> DictConfig:
    """config.yaml as written (every default), without Hydra's own keys; interpolations kept."""
    cfg = OmegaConf.load(Path(config_dir or ROOT) / f"{CONFIG_NAME}.yaml")
    for key in ("defaults", "hydra"):
        cfg.pop(key, None)
    return cfg


def repeated_yaml_keys(config_dir: Path | None = None) -> list[str]:
    """A key config.yaml gives twice in one map (YAML would keep the last one silently), as problem lines."""

    path = Path(config_dir or ROOT) / f"{CONFIG_NAME}.yaml"
    problems: list[str] = []

    def walk(node, prefix: str) -> None:
        first: dict[str, int] = {}
        for key_node, value_node in node.value if isinstance(node, yaml.MappingNode) else ():
            line = key_node.start_mark.line + 1
            if key_node.value in first:
                problems.append(
                    f"{path}:{line}: {prefix}{key_node.value} is given twice (first on line "
                    f"{first[key_node.value]}); give each key once"
                )
            first.setdefault(key_node.value, line)
            walk(value_node, f"{prefix}{key_node.value}.")

    walk(yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader), "")
    return problems


def complete_with_defaults(saved: DictConfig | dict) -> DictConfig:
    """A saved run config (possibly from an older version, missing keys) completed from config.yaml.

    The saved values win; a map whose override replaces it whole (label_to_name) is taken as saved.
    """
    saved = saved if isinstance(saved, DictConfig) else OmegaConf.create(saved)
    merged = OmegaConf.merge(default_config(), saved)
    for key in REPLACED_MAPS:
        if OmegaConf.select(saved, key) is not None:
            OmegaConf.update(merged, key, OmegaConf.select(saved, key), merge=False)
    return merged


# ---------------------------------------------------------------------------------------------- validation


def validate_config(
    cfg: DictConfig, defaults: DictConfig | None = None, problems: Sequence[str] = ()
) -> DictConfig:
    """Check every key of the composed cfg against config.yaml (types) and config_rules (ranges, choices).

    Raises one ConfigError listing every problem (after `problems` found earlier), one per line.
    Returns cfg with model.img_size as [h, w] and int label ids.
    """
    problems = [*problems, *config_problems(cfg, defaults if defaults is not None else default_config())]
    if problems:
        raise ConfigError("\n".join(problems))
    _read_legacy_variant(cfg)
    size = cfg.model.img_size
    if isinstance(size, int):  # one int means a square input
        cfg.model.img_size = [size, size]
    # int ids: `label_to_name.4=dog` on the command line makes the string key "4"
    cfg.label_to_name = {int(k): v for k, v in cfg.label_to_name.items()}
    return cfg


def _read_legacy_variant(cfg: DictConfig) -> None:
    """model.variant (configs saved before model.arch existed, or typed by habit) -> model.arch."""
    variant = cfg.model.variant
    if variant is None:
        return
    arch = LEGACY_VARIANT_ARCH[variant]
    if cfg.model.arch not in ("dfine", arch):
        raise ConfigError(
            f"model.variant={variant} (the old name of model.arch={arch}) contradicts model.arch={cfg.model.arch}; "
            "set model.arch alone"
        )
    cfg.model.arch, cfg.model.variant = arch, None


def config_problems(cfg: DictConfig, defaults: DictConfig) -> list[str]:
    """Every problem of cfg as one line naming the key, the value and what is allowed."""
    default = OmegaConf.to_container(defaults, resolve=True)
    try:
        value = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:  # e.g. an interpolation to a key that does not exist
        return [f"config: {str(err).splitlines()[0]}"]
    problems: list[str] = []
    _check_map(value, default, "", _known_keys(default), problems)
    return problems


def _check_map(value: dict, default: dict, prefix: str, known: list[str], problems: list[str]) -> None:
    for name, item in value.items():
        key = f"{prefix}{name}"
        if name in default:
            _check(item, default[name], key, known, problems)
        else:
            problems.append(unknown_key_message(key, known))
    problems.extend(
        f"{prefix}{name} is missing (config.yaml has it)" for name in default if name not in value
    )


def _check(value, default, key: str, known: list[str], problems: list[str]) -> None:
    rule = rule_for(key)
    if key in OPEN_MAPS and isinstance(value, dict):  # new entries welcome; known ones keep their type
        template = OPEN_MAPS[key]
        for name, item in value.items():
            if name in default or template is not None:
                _check(item, default[name if name in default else template], f"{key}.{name}", known, problems)
    elif isinstance(default, dict) and not (rule and rule.typed):
        if isinstance(value, dict):
            _check_map(value, default, f"{key}.", known, problems)
        else:
            problems.append(f"{key} must be a map of {', '.join(map(str, default))}, got {_show(value)}")
        return
    allowed = _leaf_problem(value, default, rule)
    if allowed:
        problems.append(f"{key} must be {allowed}, got {_show(value)}")


_KINDS = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}
_KIND_WORDS = {
    "bool": "true or false",
    "int": "an int",
    "float": "a number",
    "str": "a string",
    "list": "a list",
    "dict": "a map",
}


def _kind(default) -> str | None:
    """The type config.yaml's default says (None: a null default, any type)."""
    return _KINDS.get(type(default))


def _is_kind(value, kind: str) -> bool:
    if kind == "str":  # Hydra parses `exp_name=2024` as an int, `x=true` (for auto | true | false) as a bool
        return isinstance(value, (str, int, float, bool))
    if kind == "bool" or isinstance(value, bool):
        return isinstance(value, bool) and kind == "bool"
    if kind == "float":  # a float key accepts ints
        return isinstance(value, (int, float))
    return isinstance(value, {"int": int, "list": list, "dict": dict}[kind])


def _leaf_problem(value, default, rule: Rule | None) -> str | None:
    """What is allowed when value breaks its type or rule; None when it is fine."""
    kind = (rule.kind if rule else None) or _kind(default)
    if rule is None and kind in ("int", "float"):
        rule = NON_NEGATIVE  # every number in config.yaml is a count, size, rate or weight
    if rule is None:
        allowed = _KIND_WORDS.get(kind, "")
    else:
        allowed = rule.allowed if rule.typed or not kind else f"{_KIND_WORDS[kind]} {rule.allowed}"
    nullable = default is None or (rule is not None and rule.nullable)
    if value is None:
        return None if nullable else allowed
    allowed += " or null" * nullable
    if kind and not (rule and rule.typed) and not _is_kind(value, kind):
        return allowed
    if rule is not None and not _passes(rule, value):
        return allowed
    if kind == "list" and rule is None:
        return _list_items_problem(value, default)
    return None


def _passes(rule: Rule, value) -> bool:
    try:
        return bool(rule.ok(value))
    except (TypeError, ValueError):  # a comparison with a value of another type
        return False


def _list_items_problem(value: list, default: list) -> str | None:
    """A list key whose default items share one type: every item must have it."""
    kinds = {_kind(item) for item in default}
    if len(kinds) != 1 or None in kinds:
        return None
    kind = kinds.pop()
    return None if all(_is_kind(item, kind) for item in value) else f"a list of {kind} items"


def _show(value) -> str:
    """A value as the user would write it (null, true, "text", [1, 2])."""
    return json.dumps(value, default=str)


# ---------------------------------------------------------------------------------------------- unknown keys


def _known_keys(default: dict, prefix: str = "") -> list[str]:
    """Every dotted key of config.yaml, maps included ("train", "train.mosaic", "train.mosaic.prob"...)."""
    keys = []
    for name, value in default.items():
        key = f"{prefix}{name}"
        keys.append(key)
        if isinstance(value, dict):
            keys += _known_keys(value, f"{key}.")
    return keys


def unknown_key_message(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "see config.yaml for the keys"
    return f"unknown key {key}: {hint}"


def _open_map_of(key: str) -> str | None:
    """The open map a key lies in (label_to_name.4 -> label_to_name), else None."""
    return next((name for name in OPEN_MAPS if key.startswith(f"{name}.")), None)


# `key=value`, `+key=value`, `++key=value`, `~key[=value]`; group overrides (a/b=c) and flags are Hydra's
_OVERRIDE = re.compile(r"(?P<prefix>~|\+\+|\+)?(?P<key>[A-Za-z_][\w.\-]*)(?P<rest>=.*)?", re.DOTALL)
# Hydra's flags that take the next argument as their value (`--cfg job`, `-cn other`)
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp", "--config-name",
                     "-cn", "--config-dir", "-cd", "--experimental-rerun"}  # fmt: skip


def check_overrides(
    overrides: Sequence[str], defaults: DictConfig | None = None
) -> tuple[list[str], list[str]]:
    """Check command-line overrides before Hydra does: (the overrides Hydra should get, problems).

    An unknown key is left out, its problem naming the closest known key; so is an argument Hydra could not
    parse (no `=`, unquoted non-ASCII text), a map key given a list or a value, and a map written with one
    key twice. A new entry of an open map (label_to_name.4=dog) needs no `+`; a whole-map override of
    label_to_name replaces config.yaml's map (Hydra would merge the two).
    """
    default = OmegaConf.to_container(defaults if defaults is not None else default_config(), resolve=False)
    known = _known_keys(default)
    out, problems = [], []
    for arg, is_flag in _tell_flags(overrides):
        match = _OVERRIDE.fullmatch(arg)
        if is_flag or (match and match["key"].split(".")[0] == "hydra"):  # flags (--cfg job), Hydra's keys
            out.append(arg)
            continue
        problem = _syntax_problem(arg) or (_value_problem(arg, default) if match else None)
        if problem:
            problems.append(problem)
        elif match is None or not (match["rest"] or match["prefix"] == "~"):
            out.append(arg)  # a group override (hydra/job_logging=none)
        elif _open_map_of(match["key"]):  # an entry, new or not (the map may have been replaced just before)
            out.append(arg if match["prefix"] else f"++{arg}")
        elif match["key"] in known:
            key, rest = match["key"], match["rest"] or ""
            replace = key in REPLACED_MAPS and not match["prefix"] and rest.lstrip("=").startswith("{")
            out += [f"~{key}", f"+{arg}"] if replace else [arg]
        else:
            problems.append(unknown_key_message(match["key"], known))
    return out, problems


def _tell_flags(args: Sequence[str]) -> list[tuple[str, bool]]:
    """(arg, is a Hydra flag or a flag's value) for each command-line argument."""
    marked, after_flag = [], False
    for arg in args:
        is_flag = arg.startswith("-") or (after_flag and "=" not in arg)
        marked.append((arg, is_flag))
        after_flag = arg.split("=")[0] in _FLAGS_WITH_VALUE and "=" not in arg
    return marked


def _syntax_problem(arg: str) -> str | None:
    """What Hydra's override grammar would stop on, as one line with the fix (None: it parses)."""

    if "=" not in arg and not arg.startswith("~"):
        return f"{arg!r} is not an override: write key=value (e.g. train.epochs=10)"
    try:
        OverridesParser.create().parse_overrides([arg])
    except HydraException:
        key, _, value = arg.partition("=")
        if not value.isascii():
            quoted = re.sub(r"[^\s,:{}\[\]()='\"]*[^\x00-\x7f][^\s,:{}\[\]()='\"]*", r"'\g<0>'", value)
            return f"{arg}: text with non-ASCII letters must be quoted in an override, e.g. \"{key}={quoted}\""
        return f"{arg}: not a valid override (quote a value with spaces or special characters: key='a b')"
    return None


def _value_problem(arg: str, default: dict) -> str | None:
    """A map key given something else (Hydra would stop merging it), or a map written with a key twice."""
    key, _, text = arg.lstrip("+~").partition("=")
    expected = _default_at(default, key) if not arg.startswith("~") else None
    if isinstance(expected, dict) and not text.strip().startswith("{") and text.strip() != "null":
        rule = rule_for(key)
        allowed = rule.allowed if rule else f"a map of {', '.join(map(str, expected))}"
        return f"{key} must be {allowed}, got {text.strip()}"
    twice = _repeated_keys(text)
    if twice:
        return f"{key}={text}: key {', '.join(twice)} given twice; give each key once (the last would silently win)"
    return None


def _default_at(default: dict, key: str):
    """config.yaml's value at a dotted key (None where there is none)."""
    node = default
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _repeated_keys(text: str) -> list[str]:
    """Keys written more than once at the top level of a `{k: v, ...}` override value."""
    text = text.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return []
    keys, depth, quote, entry = [], 0, "", ""
    for char in text[1:-1] + ",":
        if quote or char in "'\"":
            quote = "" if char == quote else quote or char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            keys.append(entry.split(":", 1)[0].strip().strip("'\""))
            entry = ""
            continue
        entry += char
    return sorted({k for k in keys if k and keys.count(k) > 1})


# ---------------------------------------------------------------------------------------------- saved config


def save_run_config(cfg: DictConfig, path: Path) -> Path:
    """Write the resolved config (atomically): an experiment's copy is Experiment.file("config")."""
    return atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


def label_names(cfg: DictConfig) -> list[str]:
    """Class names ordered by id; ids must be 0..N-1."""
    mapping = {int(k): str(v) for k, v in cfg.label_to_name.items()}
    if sorted(mapping) != list(range(len(mapping))):
        raise ValueError(
            f"label_to_name ids must be 0..{len(mapping) - 1} without gaps, got {sorted(mapping)}"
        )
    return [mapping[i] for i in range(len(mapping))]
