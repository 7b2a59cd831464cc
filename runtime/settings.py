"""Loading a service's pydantic-settings tree: init values, then environment, then a YAML file, then secrets."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, YamlConfigSettingsSource

S = TypeVar("S", bound=BaseSettings)
SECRETS_DIR = Path("/run/secrets")

# Keys (dotted, from the root of a settings tree) whose path the service creates on start: only the
# nearest existing folder above them must be writable. Every other path a tree names must exist.
CREATED_ON_START = frozenset({"state_dir", "signing_key_file"})
# String keys that name a bundled foundation model or, given as a path, a bundle directory.
BUNDLE_KEYS = frozenset({"bundle", "foundation"})


class ConfigFileError(ValueError):
    """A configuration file that cannot be read as a YAML mapping (its message names the file, line and column)."""


def _check_yaml(config_file: Path) -> None:
    """Raise ConfigFileError for a YAML syntax error (with line and column) or a top level that is not a mapping."""
    try:
        data = yaml.safe_load(Path(config_file).read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{config_file}:{mark.line + 1}:{mark.column + 1}" if mark else str(config_file)
        context = ""
        if err.context and err.context_mark and err.context_mark is not mark:
            context = f" ({err.context} at line {err.context_mark.line + 1}, column {err.context_mark.column + 1})"
        raise ConfigFileError(f"{where}: YAML syntax error: {err.problem or err.context}{context}") from None
    except yaml.YAMLError as err:
        raise ConfigFileError(f"{config_file}: YAML error: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigFileError(f"{config_file}: the top level must be a mapping of keys, not {type(data).__name__}")


def load_settings(cls: type[S], config_file: Path | None = None, **overrides) -> S:
    """Settings of `cls` from (highest first) `overrides`, the environment, `config_file` (YAML), /run/secrets."""
    if config_file is not None and not Path(config_file).is_file():
        raise FileNotFoundError(f"config file {config_file} does not exist")
    if config_file is not None:
        _check_yaml(config_file)

    class _WithYaml(cls):  # type: ignore[valid-type, misc]
        @classmethod
        def settings_customise_sources(
            cls_, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if config_file is not None:
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
            return (*sources, file_secret_settings)

    _WithYaml.__name__ = cls.__name__
    secrets = str(SECRETS_DIR) if SECRETS_DIR.is_dir() else None
    return _WithYaml(_secrets_dir=secrets, **overrides)


def _paths(model: BaseModel, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Path | str]]:
    """Every path a settings tree names, nested models and lists included, with its key; bundle names too."""
    for name in type(model).model_fields:
        value, key = getattr(model, name), (*prefix, name)
        if isinstance(value, BaseModel):
            yield from _paths(value, key)
        elif isinstance(value, Path) or (name in BUNDLE_KEYS and isinstance(value, str)):
            yield key, value
        elif isinstance(value, list | tuple):
            yield from ((key + (str(i),), v) for i, v in enumerate(value) if isinstance(v, Path))


def _readable(path: Path, is_dir: bool) -> bool:
    return os.access(path, os.R_OK | os.X_OK) if is_dir else os.access(path, os.R_OK)


def _path_problem(key: tuple[str, ...], value: Path | str) -> str | None:
    """What is wrong with the path under `key`, or None."""
    if isinstance(value, str):  # a bundle: a bundled model's name, or a bundle directory
        import bundled

        if os.sep not in value and not value.startswith(".") and not Path(value).is_dir():
            try:
                bundled.path(value)
            except FileNotFoundError as err:
                return str(err)
            return None
        value = Path(value)
        if not (value / "manifest.json").is_file():
            return f"{value} is not a bundle directory (no manifest.json in it)"
        return None if _readable(value, True) else f"{value} is not readable by this user"
    name = key[-2] if key[-1].isdigit() else key[-1]
    want_dir = name.endswith("_dir")
    if ".".join(key) in CREATED_ON_START and not value.exists():
        parent = next(p for p in value.absolute().parents if p.exists())
        if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
            return f"{value} does not exist and cannot be created: {parent} is not a writable folder"
        return None
    if not value.exists():
        return f"{value} does not exist"
    if want_dir and not value.is_dir():
        return f"{value} is not a folder"
    if name.endswith(("_file", "_files")) and not value.is_file():
        return f"{value} is not a file"
    if not _readable(value, value.is_dir()):
        return f"{value} is not readable by this user"
    if ".".join(key) in CREATED_ON_START and value.is_dir() and not os.access(value, os.W_OK | os.X_OK):
        return f"{value} is not writable by this user"
    return None


def path_problems(settings: BaseModel) -> list[tuple[str, str]]:
    """(key, problem) for every file or folder the settings name that is missing or unreadable.

    Folders and files the service creates on start (CREATED_ON_START) may be missing if they can be created.
    """
    problems = []
    for key, value in _paths(settings):
        problem = _path_problem(key, value)
        if problem is not None:
            problems.append((".".join(key), problem))
    return problems


def _report(cls: type[BaseSettings], problems: list[tuple[tuple[str | int, ...], str]]) -> None:
    prefix = cls.model_config.get("env_prefix", "")
    print(f"error: invalid configuration ({len(problems)} problem(s)):", file=sys.stderr)
    for loc, msg in problems:
        key = ".".join(str(p) for p in loc) or "(root)"
        # A list item's environment variable is the whole list, in JSON.
        env = prefix + "__".join(str(p) for p in loc if not str(p).isdigit()).upper()
        where = f"  (YAML key {key!r}, environment {env})" if loc else ""
        print(f"  {key}: {msg}{where}", file=sys.stderr)


def validate_or_exit(
    cls: type[S], config_file: Path | None, validate_only: bool, check_paths: bool = True, **overrides
) -> S:
    """Load settings; on error print each offending key and exit 2. With `validate_only`, print them and exit 0.

    With `check_paths` (what a service needs before it starts), every file and folder the settings name must
    exist and be readable (see `path_problems`); commands that only read the state folder turn it off.
    """
    try:
        settings = load_settings(cls, config_file, **overrides)
    except ValidationError as err:
        _report(cls, [(tuple(e["loc"]), e["msg"]) for e in err.errors()])
        sys.exit(2)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    problems = path_problems(settings) if check_paths else []
    if problems:
        _report(cls, [(tuple(key.split(".")), msg) for key, msg in problems])
        sys.exit(2)
    if validate_only:
        print(settings.model_dump_json(indent=1))
        sys.exit(0)
    return settings
