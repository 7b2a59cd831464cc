"""The edge's configuration tree (pydantic-settings): environment prefix FEDGE_EDGE_, nested with `__`, or YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract import signing
from contract.payloads import SiteId
from contract.topics import DEFAULT_PREFIX
from runtime.mqtt import BrokerSettings
from runtime.threads import DEFAULT_THREADS


class EdgeSettings(BaseSettings):
    """Everything `fedge-edge run` reads."""

    model_config = SettingsConfigDict(env_prefix="FEDGE_EDGE_", env_nested_delimiter="__", extra="forbid")

    site_id: SiteId = Field(description="This site's id: its topics, its MQTT user name, its contributions.")
    data_dir: Path = Field(description="Local data folder: <label>/<sample_id>.<png|jpg|npy> (+ metadata.csv).")
    state_dir: Path = Field(default=Path("var/edge"), description="Sample index, outbox and delivered models.")
    bundle: str = Field(
        default="digits", description="Bundled foundation model name or bundle directory (its encoder)."
    )
    sd_encoders_dir: Path | None = Field(
        default=None,
        description="Exported CLIP text encoder (fedge-hub export-encoders) for a Stable Diffusion hub; "
        "when set, the site sends prompt embeddings of captions or class names instead of image embeddings.",
    )
    sd_conditioning: Literal["text", "image"] = Field(
        default="text",
        description="text: prompt embeddings of captions or class names; image: CLIP image embeddings of the samples "
        "(for an unCLIP checkpoint, whose export has an image encoder).",
    )
    prompt_template: str = Field(
        default="a photo of a {label}", description="Class-name prompt for samples without a caption in metadata.csv."
    )
    k: int = Field(default=4, ge=1, le=256, description="Prototypes per label (1 = class level).")
    min_group_size: int = Field(default=5, ge=1, description="Fewest samples one prototype may average.")
    holdout_fraction: float = Field(
        default=0.2,
        ge=0.0,
        lt=1.0,
        description="Share of samples kept out of contributions to evaluate delivered models.",
    )
    scan_interval_s: float = Field(default=2.0, gt=0, le=3600, description="How often the data folder is rescanned.")
    settle_s: float = Field(
        default=1.0, ge=0, le=3600, description="Wait this long after the last file change before contributing."
    )
    hub_public_key_file: Path | None = Field(
        default=None,
        description="The hub's Ed25519 public key (PEM) that model manifests must be signed with. When absent, the "
        "site trusts the key the hub first publishes in hub/status and pins it (trust on first use, logged).",
    )
    operator_public_key_files: list[Path] = Field(
        default_factory=list,
        description="Ed25519 public keys (PEM) of the operators who may sign forget requests for this site "
        "(fedge-edge keygen makes a pair). Empty: every forget request is refused with unknown_key.",
    )
    site_key_file: Path | None = Field(
        default=None,
        description="The site's own Ed25519 private key (PEM), which signs its forget receipts. When absent, the site "
        "uses <state_dir>/keys/site.pem, created on first start (its public half beside it, site.pub.pem).",
    )
    forget_max_age_s: float = Field(
        default=86400.0,
        gt=0,
        le=366 * 86400,
        description="A forget request issued longer ago than this (or more than 300 s ahead of the site's clock) is "
        "refused as a replay.",
    )
    threads: int = Field(
        default=DEFAULT_THREADS, ge=1, le=256,
        description="onnxruntime intra-op threads of the encoder (runtime/threads.py): 1 suits a shared machine.",
    )  # fmt: skip
    prefer_cuda: bool = Field(default=True, description="Use onnxruntime's CUDA provider when this build has it.")
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    topic_prefix: str = Field(default=DEFAULT_PREFIX, description="Prefix of every topic.")
    metrics_host: str = Field(default="0.0.0.0", description="Address of /metrics and /healthz.")
    metrics_port: int | None = Field(
        default=9401, ge=0, le=65535, description="Port of /metrics and /healthz (0: any free port; null: off)."
    )

    @model_validator(mode="after")
    def _check(self) -> EdgeSettings:
        if "{label}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {label}")
        if self.sd_encoders_dir is not None and not (self.sd_encoders_dir / "manifest.json").is_file():
            raise ValueError(
                f"sd_encoders_dir {self.sd_encoders_dir} has no manifest.json (run fedge-hub export-encoders)"
            )
        for path in self.operator_public_key_files:
            if not path.is_file():
                raise ValueError(f"operator public key file {path} does not exist")
            try:
                signing.load_public_key(path)
            except ValueError as err:
                raise ValueError(f"operator public key file {err} (expected an Ed25519 public key in PEM)") from None
        if self.site_key_file is not None and not self.site_key_file.is_file():
            raise ValueError(
                f"site_key_file {self.site_key_file} does not exist; make one with `fedge-edge keygen --out "
                f"{self.site_key_file}`, or leave site_key_file unset to let the site create <state_dir>/keys/site.pem"
            )
        return self

    @property
    def site_key_path(self) -> Path:
        """Where the site's receipt-signing key is: `site_key_file`, else `<state_dir>/keys/site.pem`."""
        return self.site_key_file or self.state_dir / "keys" / "site.pem"
