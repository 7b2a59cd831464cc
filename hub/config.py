"""The hub's configuration tree (pydantic-settings): environment prefix FEDGE_HUB_, nested with `__`, or YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.payloads import SiteId
from contract.topics import DEFAULT_PREFIX, SHARE_GROUP
from hub.delivery import DEFAULT_CHUNK_BYTES
from hub.framu import RECOMMENDED
from hub.intake import DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_MIN_GROUP_SIZE
from runtime.mqtt import BrokerSettings
from runtime.threads import DEFAULT_THREADS


class RoundPolicy(BaseModel):
    """When the hub starts a round on its own (`fedge-hub round start` can always ask for one)."""

    model_config = ConfigDict(extra="forbid")

    min_sites: int = Field(
        default=3, ge=1, description="Start once this many sites have a contribution not yet in a model."
    )
    deadline_s: float | None = Field(
        default=None, gt=0, description="Start anyway this long after the first change not yet in a model."
    )
    poll_s: float = Field(default=0.5, gt=0, le=60, description="How often the policy is checked.")
    refine: bool = Field(
        default=False,
        description="Closed-form refinement round (docs/unlearning.md): sites send additive statistics of the "
        "delivered model's projected features and the hub solves the head from them exactly (model closed_form).",
    )
    refine_features: Literal["auto", "rff", "embedding", "embedding+rff"] = Field(
        default="auto",
        description="What the sites' statistics are computed over (hub/refinement/features.py): the encoder's "
        "embedding (a linear head, as Fed3R), the closed-form model's random Fourier features (a kernel head), or "
        "embedding+rff (both: the embedding whole, the random features projected to the remaining dimensions; "
        "needs refine_dim above the embedding's width); auto: the embedding when it has at least refine_dim dimensions (the general encoder), else the random "
        "features (the bundled digits encoder). Chosen on validation carves (docs/evaluate.md).",
    )
    refine_dim: int = Field(
        default=128, ge=8, le=512,
        description="Projected feature dimension: a site uploads dim (dim + 1) / 2 + labels x dim float16 values "
        "(128: about 22 KB of JSON for 2 labels, 26 KB for 10).",
    )  # fmt: skip
    refine_wait_s: float = Field(
        default=60.0, gt=0, le=86400,
        description="How long new statistics wait for every site's before the hub solves from those it has.",
    )  # fmt: skip
    refine_lam: float = Field(
        default=1e-4, gt=0, le=10, description="Ridge regularisation of the refined model's `logits` head."
    )
    refine_lams: list[float] = Field(
        default=[1e-3, 1e-2, 1e-1],
        description="One more head per lambda, ONNX outputs head_refined_<i>, solved from the same statistics; "
        "the delivery gate serves whichever head has the best pooled held-out balanced accuracy.",
    )
    refine_refit: bool = Field(
        default=True,
        description="Once the delivery gate serves a refined head, ask the sites for statistics of their held-out "
        "samples too and solve that head's lambda again from every sample (docs/delivery-gate.md): the held-out "
        "fifth chose the lambda and then trains the model. One more upload of the same size per site.",
    )

    @model_validator(mode="after")
    def _refine_lams_in_range(self) -> RoundPolicy:
        if any(not 0 < lam <= 10 for lam in self.refine_lams) or len(self.refine_lams) > 8:
            raise ValueError("rounds.refine_lams: at most 8 values, each in (0, 10]")
        return self


class SynthesisSettings(BaseModel):
    """Synthesis and training of the global model (see hub/synthesis.py and hub/rounds.py)."""

    model_config = ConfigDict(extra="forbid")

    samples_per_count: float = Field(
        default=4.0, gt=0, description="Synthetic samples per real sample a prototype stands for."
    )
    guidance: float = Field(default=1.0, ge=1.0, le=10.0, description="Classifier-free guidance scale (1 = none).")
    steps: int = Field(default=15, ge=1, le=1000, description="DDIM sampling steps.")
    epochs: int = Field(default=30, ge=1, le=1000, description="Classifier training epochs.")
    seed: int = Field(default=0, description="Seed of synthesis and training (same seed, same model).")


class ClosedFormSettings(BaseModel):
    """The exactly unlearnable global model: random features of the bundle's encoder and a closed-form head."""

    model_config = ConfigDict(extra="forbid")

    n_features: int = Field(
        default=1024, ge=16, le=8192, description="Random Fourier features (memory: D^2 x 8 B per contribution)."
    )
    bandwidth: float = Field(default=0.7, gt=0, le=100, description="Length scale of the approximated RBF kernel.")
    variant: Literal["ridge", "ridge-balanced", "lda"] = Field(
        default="ridge-balanced", description="How the head is solved."
    )
    lam: float = Field(default=1e-6, gt=0, le=10, description="Ridge regularisation of G/N.")
    threads: int = Field(default=1, ge=1, le=64, description="onnxruntime threads for the hub's feature extraction.")
    verify_refit: bool = Field(
        default=True, description="Before a certificate, refit from scratch and report the difference (0 when exact)."
    )
    synthesis: Literal["auto", "features", "images"] = Field(
        default="auto",
        description="What the statistics are computed from: images (the bundle's image generator, then its encoder) "
        "or features (synthetic embeddings around the prototypes, hub/learning/feature_synthesis.py); auto: "
        "features when the bundle has no image generator (the general bundle), else images.",
    )
    feature_generator: Path | None = Field(
        default=None,
        description="Folder of a feature generator trained on public data (hub/learning/feature_synthesis.py); "
        "null: Gaussian sampling around the prototypes, which needs no public data.",
    )


class DeliveryGateSettings(BaseModel):
    """The delivery gate (docs/delivery-gate.md): which head of a new model the sites serve, decided on their
    held-out evaluations of every head."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=True,
        description="Sites evaluate a new model's heads (candidate, nearest prototype, refined) before serving it "
        "and serve the best; off: they serve the candidate at once.",
    )
    wait_s: float = Field(
        default=300.0, gt=0, le=86400,
        description="How long the gate waits for the evaluations of every site with a contribution in the model "
        "before it decides on those it has.",
    )  # fmt: skip
    chance_margin: float = Field(
        default=0.05, ge=0, le=0.5,
        description="A best head within this much balanced accuracy of chance is not served as an improvement.",
    )  # fmt: skip


class FramuSettings(BaseModel):
    """FRAMU: attention over contributions, learned from the sites' evaluations (docs/framu.md)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["off", "recommend", "auto"] = Field(
        default="recommend",
        description="off: uniform weights, no attention; recommend: attention computed, reported and exported, "
        "models trained with uniform weights, nothing unlearned; auto: attention weights set each contribution's "
        "share of the training set and contributions below the threshold for `patience` rounds are unlearned "
        "exactly (needs model closed_form).",
    )
    threshold: float = Field(
        default=RECOMMENDED.threshold, gt=0, lt=1, description="Attention below which a contribution is a candidate."
    )
    patience: int = Field(
        default=RECOMMENDED.patience,
        ge=1,
        le=100,
        description="Consecutive rounds below the threshold before unlearning.",
    )
    outdated_after_s: float = Field(
        default=RECOMMENDED.outdated_after_s, ge=0,
        description="A candidate whose site sent nothing newer for this long is unlearned as `outdated`, "
        "else as `irrelevant`.",
    )  # fmt: skip
    eval_wait_s: float = Field(
        default=600.0, gt=0, le=86400,
        description="How long the reward for a model waits for every site's evaluation before it uses those in.",
    )  # fmt: skip
    max_rounds: int = Field(
        default=5, ge=0, le=100,
        description="Rounds in a row that FRAMU may start on its own (each ships a model) while a contribution "
        "is below the threshold but not yet decided; new input resets the count.",
    )  # fmt: skip
    loo_heads: int = Field(
        default=RECOMMENDED.loo_max, ge=0, le=16,
        description="Leave-one-out heads per model for the counterfactual evidence (docs/framu.md): the sites "
        "evaluate the model without each of up to this many low-attention contributions. Each head is "
        "n_features x labels float32 in the delivered model (40 KiB for 1024 features and 10 labels). 0: none; "
        "on validation they did not help.",
    )  # fmt: skip


class StableDiffusionSettings(BaseModel):
    """A Stable Diffusion checkpoint on local disk and its encoders exported for the sites."""

    model_config = ConfigDict(extra="forbid")

    model_dir: Path = Field(
        description="Diffusers-layout directory (model_index.json, unet/, vae/, text_encoder/, tokenizer/)."
    )
    encoders_dir: Path = Field(
        description="Output of `fedge-hub export-encoders --model MODEL_DIR --out ENCODERS_DIR`."
    )
    image_size: int = Field(default=32, ge=4, le=1024, description="Side of the global classifier's grayscale input.")


class HubSettings(BaseSettings):
    """Everything `fedge-hub run` reads."""

    model_config = SettingsConfigDict(env_prefix="FEDGE_HUB_", env_nested_delimiter="__", extra="forbid")

    hub_id: SiteId = Field(default="hub", description="Name of this hub worker (MQTT client id fedge-hub-<hub_id>).")
    state_dir: Path = Field(default=Path("var/hub"), description="Ledger, model versions and synthesis cache.")
    backend: Literal["bundled", "stable-diffusion"] = Field(
        default="bundled",
        description="Foundation model: the bundled one (default) or Stable Diffusion from local weights.",
    )
    foundation: str = Field(default="digits", description="Bundled foundation model name or bundle directory.")
    stable_diffusion: StableDiffusionSettings | None = Field(
        default=None, description="Needed when backend is stable-diffusion."
    )
    threads: int = Field(
        default=DEFAULT_THREADS, ge=1, le=256,
        description="Threads per torch and onnxruntime pool (runtime/threads.py): 1 suits a machine shared with other "
        "work; raise it to the cores this hub owns.",
    )  # fmt: skip
    device: str = Field(default="auto", description="torch device for synthesis and training: auto, cpu or cuda.")
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    topic_prefix: str = Field(default=DEFAULT_PREFIX, description="Prefix of every topic.")
    share_group: str = Field(default=SHARE_GROUP, description="Shared-subscription group of the hub workers (MQTT v5).")
    rounds: RoundPolicy = Field(default_factory=RoundPolicy)
    synthesis: SynthesisSettings = Field(default_factory=SynthesisSettings)
    model: Literal["closed_form", "cnn"] = Field(
        default="closed_form",
        description="closed_form: exactly unlearnable by re-solving (bundled backend); cnn: the SmallCNN, retrained "
        "from scratch on every change (the only choice with Stable Diffusion).",
    )
    closed_form: ClosedFormSettings = Field(default_factory=ClosedFormSettings)
    framu: FramuSettings = Field(default_factory=FramuSettings)
    delivery: DeliveryGateSettings = Field(default_factory=DeliveryGateSettings)
    site_keys_dir: Path | None = Field(
        default=None,
        description="Folder of sites' public keys (<site_id>.pub.pem) that forget receipts must be signed with; "
        "a site without one here is pinned from its first receipt.",
    )
    max_payload_bytes: int = Field(
        default=DEFAULT_MAX_PAYLOAD_BYTES, ge=1024, description="Larger payloads are rejected."
    )
    min_group_size: int = Field(
        default=DEFAULT_MIN_GROUP_SIZE,
        ge=1,
        le=10**6,
        description="Fewest samples every prototype must average, whatever an upload declares (else: group_size).",
    )
    signing_key_file: Path | None = Field(
        default=None,
        description="Ed25519 private key (PEM, PKCS#8) that signs model manifests and unlearning certificates; "
        "default <state_dir>/keys/hub-signing.pem, created with its .pub.pem on first start.",
    )
    intake_stall_s: float = Field(
        default=60.0, gt=0, le=3600, description="/healthz turns unhealthy when one message takes longer than this."
    )
    stop_grace_s: float = Field(
        default=5.0, gt=0, le=300, description="How long a stop waits for a round to reach a safe point."
    )
    chunk_bytes: int = Field(default=DEFAULT_CHUNK_BYTES, ge=1024, le=16 * 1024 * 1024, description="Model chunk size.")
    metrics_host: str = Field(default="0.0.0.0", description="Address of /metrics and /healthz.")
    metrics_port: int | None = Field(
        default=9400, ge=0, le=65535, description="Port of /metrics and /healthz (0: any free port; null: off)."
    )

    @model_validator(mode="after")
    def _check(self) -> HubSettings:
        if self.device not in {"auto", "cpu", "cuda"} and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.backend == "stable-diffusion" and "model" not in self.model_fields_set:
            self.model = "cnn"  # the closed-form head needs an image encoder in ONNX, which SD checkpoints lack
        if self.backend == "stable-diffusion" and self.model == "closed_form":
            raise ValueError("model closed_form needs the bundled backend (an image encoder in ONNX); use model: cnn")
        if self.rounds.refine and self.model != "closed_form":
            raise ValueError(
                "rounds.refine needs model closed_form (the feature part sites run is its encoder and features)"
            )
        if self.rounds.refine and self.closed_form.variant == "lda":
            raise ValueError(
                "rounds.refine needs closed_form.variant ridge or ridge-balanced: the sites' float16 statistics keep "
                "the ridge system positive definite, but not lda's within-class scatter (docs/mqtt.md)"
            )
        if self.framu.mode == "auto" and self.model != "closed_form":
            raise ValueError(
                "framu.mode auto weighs each contribution's statistics, which needs model closed_form; "
                "use framu.mode recommend with model cnn"
            )
        if self.backend == "stable-diffusion" and self.stable_diffusion is None:
            raise ValueError(
                "backend stable-diffusion needs stable_diffusion.model_dir and stable_diffusion.encoders_dir"
            )
        return self

    def signing_key_path(self) -> Path:
        """Where the hub's signing key is (or will be created)."""
        return self.signing_key_file or self.state_dir / "keys" / "hub-signing.pem"
