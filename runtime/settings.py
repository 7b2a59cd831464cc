"""Loading a service's pydantic-settings tree: init values, then environment, then a YAML file, then secrets."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, YamlConfigSettingsSource

S = TypeVar("S", bound=BaseSettings)
SECRETS_DIR = Path("/run/secrets")


def load_settings(cls: type[S], config_file: Path | None = None, **overrides) -> S:
    """Settings of `cls` from (highest first) `overrides`, the environment, `config_file` (YAML), /run/secrets."""
    if config_file is not None and not Path(config_file).is_file():
        raise FileNotFoundError(f"config file {config_file} does not exist")

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


def validate_or_exit(cls: type[S], config_file: Path | None, validate_only: bool, **overrides) -> S:
    """Load settings; on error print each offending key and exit 2. With `validate_only`, print them and exit 0."""
    try:
        settings = load_settings(cls, config_file, **overrides)
    except ValidationError as err:
        prefix = cls.model_config.get("env_prefix", "")
        print(f"error: invalid configuration ({err.error_count()} problem(s)):", file=sys.stderr)
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(root)"
            env = prefix + "__".join(str(p) for p in e["loc"]).upper()
            print(f"  {key}: {e['msg']}  (YAML key {key!r}, environment {env})", file=sys.stderr)
        sys.exit(2)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if validate_only:
        print(settings.model_dump_json(indent=1))
        sys.exit(0)
    return settings
