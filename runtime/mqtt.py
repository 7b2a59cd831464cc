"""The MQTT boundary: the only module that imports paho. Edge and hub services talk to a `Bus`.

MQTT v5 by default (persistent session with an expiry, shared subscriptions); MQTT 3.1.1 for brokers
that refuse v5, such as the embedded Python broker (persistent session through clean_session=False,
no shared subscriptions). QoS 1 everywhere. Incoming messages are acknowledged only after their
handler returned, so whatever the handler made durable is durable before the broker forgets the
message. Every message is acknowledged, whatever its handler did: an unacknowledged message holds
one of the broker's in-flight slots for this session, and once the window is full the broker
delivers nothing more, across reconnects too. So handlers give every message an outcome
themselves (accepted, duplicate, or rejected with a reason); an exception that still escapes one is
logged, counted through `on_handler_error`, and the message is acknowledged all the same.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Message:
    """One message as a handler sees it. `retain` is set when the broker replays a retained message."""

    topic: str
    payload: bytes
    retain: bool = False


Handler = Callable[[Message], None]


class TlsSettings(BaseModel):
    """TLS to the broker: a CA to trust, and optionally a client certificate."""

    model_config = ConfigDict(extra="forbid")

    ca_file: Path = Field(description="PEM file of the CA that signed the broker's certificate.")
    cert_file: Path | None = Field(default=None, description="Client certificate (PEM) for mutual TLS.")
    key_file: Path | None = Field(default=None, description="Private key of the client certificate.")

    @model_validator(mode="after")
    def _pair(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self


class BrokerSettings(BaseModel):
    """Where the broker is and how to log in."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="Broker host name or address.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port (8883 is usual with TLS).")
    username: str | None = Field(default=None, description="MQTT user name; sites use their site id.")
    password: SecretStr | None = Field(default=None, description="MQTT password; prefer password_file.")
    password_file: Path | None = Field(default=None, description="File holding the MQTT password (a Docker secret).")
    tls: TlsSettings | None = Field(default=None, description="TLS settings; plain TCP when absent.")
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive.")
    protocol: Literal["5", "3.1.1"] = Field(default="5", description="MQTT protocol version.")
    session_expiry_s: int = Field(
        default=7 * 24 * 3600, ge=0, description="How long the broker keeps a disconnected client's session (v5)."
    )

    @model_validator(mode="after")
    def _login(self) -> BrokerSettings:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if (self.password is not None or self.password_file is not None) and self.username is None:
            raise ValueError("password must be provided with username")
        return self

    def secret(self) -> str | None:
        """The password, read from `password_file` when that is how it was given."""
        if self.password_file is not None:
            return self.password_file.read_text().strip()
        return self.password.get_secret_value() if self.password else None


class NotConnected(RuntimeError):
    """Raised by `publish` when the broker cannot be reached or does not acknowledge in time."""


class Bus:
    """A connected MQTT client with durable-session semantics, used by the services."""

    def __init__(
        self,
        client_id: str,
        broker: BrokerSettings,
        will: tuple[str, bytes] | None = None,
        persistent: bool = True,
        on_connect: Callable[[], None] | None = None,
        on_state: Callable[[bool], None] | None = None,
        on_handler_error: Callable[[Message, BaseException], None] | None = None,
    ):
        self.broker = broker
        self.client_id = client_id
        self.v5 = broker.protocol == "5"
        self._persistent = persistent
        self._subs: dict[str, Handler] = {}
        self._connected = threading.Event()
        self._on_connect_hook = on_connect
        self._on_state = on_state
        self._on_handler_error = on_handler_error
        self._busy_since: float | None = None  # monotonic start of the handler now running, if any
        self._lock = threading.Lock()
        self._loop_thread_ident: int | None = None
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            clean_session=None if self.v5 else not persistent,
            manual_ack=True,
        )
        # paho: must be set before connect(). Queue everything while offline (the caller bounds it).
        self.client.max_inflight_messages_set(20)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 30)
        if broker.username is not None:
            self.client.username_pw_set(broker.username, broker.secret())
        if broker.tls is not None:
            t = broker.tls
            self.client.tls_set(
                ca_certs=str(t.ca_file),
                certfile=str(t.cert_file) if t.cert_file else None,
                keyfile=str(t.key_file) if t.key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = self._handle_message

    # --- lifecycle ---
    def start(self) -> None:
        """Connect in the background; reconnects on its own until `stop`."""
        props = None
        clean_start: bool | int = mqtt.MQTT_CLEAN_START_FIRST_ONLY
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.broker.session_expiry_s if self._persistent else 0
            clean_start = not self._persistent
        self.client.connect_async(
            self.broker.host, self.broker.port, self.broker.keepalive_s, clean_start=clean_start, properties=props
        )
        self.client.loop_start()
        # paho exposes no public handle on its network thread; publish() uses this to refuse to wait on it.
        # _handle_connect records the same ident once connected, should paho ever start it lazily.
        self._loop_thread_ident = getattr(self.client._thread, "ident", None)

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (True) or `timeout` passed (False)."""
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        """Whether the broker accepted the connection and it has not dropped since."""
        return self._connected.is_set()

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Publish `final` (retained, e.g. a clean 'stopped' status), then disconnect without the last-will."""
        if final is not None and self.connected:
            try:
                self.publish(final[0], final[1], retain=True, timeout=timeout)
            except NotConnected as err:
                log.warning("could not publish final status: %s", err)
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()

    # --- messages ---
    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        """Route messages matching `topic_filter` to `handler(topic, payload)`; kept across reconnects."""
        with self._lock:
            self._subs[topic_filter] = handler
        if self.connected:
            self.client.subscribe(topic_filter, qos=1)

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop routing `topic_filter`."""
        with self._lock:
            self._subs.pop(topic_filter, None)
        if self.connected:
            self.client.unsubscribe(topic_filter)

    def publish(self, topic: str, payload: bytes, retain: bool = False, timeout: float = 10.0) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK; raise NotConnected otherwise.

        Not for use inside a message handler (it would wait on its own network thread): use `publish_nowait`.
        """
        if threading.get_ident() == self._loop_thread_ident:
            raise RuntimeError("publish() inside a message handler would deadlock; use publish_nowait()")
        if not self.connected:
            raise NotConnected(f"not connected to {self.broker.host}:{self.broker.port}")
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as err:
            raise NotConnected(f"publish to {topic} failed: {err}") from None
        if not info.is_published():
            raise NotConnected(f"no PUBACK for {topic} within {timeout:.0f} s")

    def publish_nowait(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Queue a QoS 1 publish (sent when connected) without waiting for the broker."""
        self.client.publish(topic, payload, qos=1, retain=retain)

    # --- paho callbacks (network thread) ---
    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker %s:%s refused the connection: %s", self.broker.host, self.broker.port, reason_code)
            return
        self._loop_thread_ident = threading.get_ident()
        with self._lock:
            filters = list(self._subs)
        for f in filters:
            client.subscribe(f, qos=1)
        self._connected.set()
        log.info("connected to %s:%s as %s", self.broker.host, self.broker.port, self.client_id)
        if self._on_state:
            self._on_state(True)
        if self._on_connect_hook:
            self._on_connect_hook()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was:
            level = logging.WARNING if reason_code.is_failure else logging.INFO
            log.log(level, "disconnected from %s:%s: %s", self.broker.host, self.broker.port, reason_code)
        if self._on_state:
            self._on_state(False)

    def handler_busy_for(self) -> float:
        """Seconds the message handler now running has taken (0 when idle): /healthz reports a stalled intake."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def _handle_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            handlers = [h for f, h in self._subs.items() if _matches(f, msg.topic)]
        message = Message(msg.topic, bytes(msg.payload), bool(msg.retain))
        self._busy_since = time.monotonic()
        try:
            for h in handlers:
                try:
                    h(message)
                except Exception as err:  # the last line of defence: handlers give outcomes themselves
                    log.exception("handler failed on %s; the message is acknowledged as rejected", msg.topic)
                    if self._on_handler_error is not None:
                        try:
                            self._on_handler_error(message, err)
                        except Exception:
                            log.exception("on_handler_error failed on %s", msg.topic)
        finally:
            self._busy_since = None
            if msg.qos > 0:
                client.ack(msg.mid, msg.qos)


def _matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic-filter matching, `$share/<group>/` prefixes stripped."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    return mqtt.topic_matches_sub(topic_filter, topic)
