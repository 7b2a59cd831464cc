"""MQTT topic names: the one place that spells them (docs/mqtt.md documents each).

<prefix>/site/<site_id>/status            site -> all   retained, last-will "offline"
<prefix>/site/<site_id>/embeddings        site -> hub   contributions
<prefix>/site/<site_id>/eval              site -> hub   federated evaluation of a delivered model
<prefix>/site/<site_id>/errors            hub -> site   why a message from that site was rejected
<prefix>/site/<site_id>/forget/request    operator -> site (never retained)
<prefix>/site/<site_id>/forget/receipt    site -> hub   (never retained)
<prefix>/site/<site_id>/refine            site -> hub   refinement statistics (rounds.refine)
<prefix>/hub/status                       hub -> all    retained
<prefix>/hub/model                        hub -> all    retained model manifest
<prefix>/hub/model/<version>/<index>      hub -> all    retained model artifact chunks
<prefix>/hub/certificate                  hub -> all    unlearning certificates
<prefix>/hub/refine                       hub -> all    retained refinement request (rounds.refine)
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.payloads import valid_site_id

DEFAULT_PREFIX = "fedge/v1"
SHARE_GROUP = "fedge-hub"

# Message kinds a site publishes, by the last topic level(s) under site/<site_id>/.
SITE_KINDS = ("status", "embeddings", "eval", "errors", "forget/request", "forget/receipt", "refine")


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "#+\x00") or self.prefix.endswith("/"):
            raise ValueError(f"topic prefix {self.prefix!r} must be non-empty, without wildcards or a trailing '/'")

    def site(self, site_id: str, kind: str) -> str:
        """`<prefix>/site/<site_id>/<kind>` for one of SITE_KINDS."""
        if kind not in SITE_KINDS:
            raise ValueError(f"unknown site topic kind {kind!r}; known: {', '.join(SITE_KINDS)}")
        if not valid_site_id(site_id):
            raise ValueError(f"site id {site_id!r} cannot appear in a topic")
        return f"{self.prefix}/site/{site_id}/{kind}"

    def all_sites(self, kind: str) -> str:
        """Subscription filter for one kind from every site."""
        if kind not in SITE_KINDS:
            raise ValueError(f"unknown site topic kind {kind!r}")
        return f"{self.prefix}/site/+/{kind}"

    def shared(self, topic_filter: str, group: str = SHARE_GROUP) -> str:
        """An MQTT v5 shared subscription, so several hub workers split the messages."""
        return f"$share/{group}/{topic_filter}"

    def parse_site(self, topic: str) -> tuple[str, str] | None:
        """(site_id, kind) of a site topic, or None when `topic` is not one."""
        head = f"{self.prefix}/site/"
        if not topic.startswith(head):
            return None
        site_id, _, kind = topic[len(head) :].partition("/")
        if kind not in SITE_KINDS or not valid_site_id(site_id):
            return None
        return site_id, kind

    @property
    def hub_status(self) -> str:
        return f"{self.prefix}/hub/status"

    @property
    def hub_model(self) -> str:
        return f"{self.prefix}/hub/model"

    def model_chunk(self, version: int, index: int) -> str:
        """Topic of one retained chunk of a model artifact."""
        return f"{self.prefix}/hub/model/{version}/{index}"

    def model_chunks(self, version: int) -> str:
        """Subscription filter for every chunk of one model version."""
        return f"{self.prefix}/hub/model/{version}/+"

    @property
    def hub_certificate(self) -> str:
        return f"{self.prefix}/hub/certificate"

    @property
    def hub_refine(self) -> str:
        return f"{self.prefix}/hub/refine"
