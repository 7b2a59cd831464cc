"""A small in-process MQTT 3.1.1 broker, for the demo on machines without Mosquitto. Not for production.

What fedge needs and no more: QoS 0 and 1 (QoS 2 is granted as 1), retained messages, last-will,
persistent sessions (clean_session=0 keeps subscriptions and queues QoS 1 messages while the client
is away, and resends unacknowledged ones), keepalive, `+`/`#` filters. No authentication, no TLS,
no MQTT v5 (so no shared subscriptions): clients connect with protocol "3.1.1". The pure-Python
brokers on PyPI either refuse v5 too or cannot be installed beside Flower (amqtt pins typer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import threading
from collections import deque
from dataclasses import dataclass, field

from paho.mqtt.client import topic_matches_sub

log = logging.getLogger(__name__)

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 1, 2, 3, 4, 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14
MAX_QUEUED = 100_000  # per offline session; far above anything fedge sends, and bounded


@dataclass
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool = False


@dataclass
class Session:
    client_id: str
    persistent: bool
    subscriptions: dict[str, int] = field(default_factory=dict)
    queued: deque[Message] = field(default_factory=deque)
    inflight: dict[int, Message] = field(default_factory=dict)
    writer: asyncio.StreamWriter | None = None
    next_pid: int = 1

    def pid(self) -> int:
        while True:
            p = self.next_pid
            self.next_pid = p % 65535 + 1
            if p not in self.inflight:
                return p


def _string(buf: bytes, i: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from("!H", buf, i)
    return buf[i + 2 : i + 2 + n], i + 2 + n


def _encode_string(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    n, length = len(body), bytearray()
    while True:
        b, n = n % 128, n // 128
        length.append(b | (0x80 if n else 0))
        if not n:
            break
    return bytes([(kind << 4) | flags]) + bytes(length) + body


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    head = (await reader.readexactly(1))[0]
    mult, length = 1, 0
    for _ in range(4):
        b = (await reader.readexactly(1))[0]
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    else:
        raise ValueError("malformed remaining length")
    return head >> 4, head & 0x0F, await reader.readexactly(length)


class EmbeddedBroker:
    """Runs the broker on its own event loop in a daemon thread: `start()` returns the bound port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port
        self.sessions: dict[str, Session] = {}
        self.retained: dict[str, Message] = {}
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="embedded-broker", daemon=True)

    def start(self) -> int:
        """Listen and serve in the background; the port it listens on."""
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._client, self.host, self.port), self._loop)
        self._server = fut.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("embedded MQTT 3.1.1 broker on %s:%d", self.host, self.port)
        return self.port

    def stop(self) -> None:
        """Close every connection and stop the loop."""

        async def _close() -> None:
            assert self._server is not None
            self._server.close()
            for s in self.sessions.values():
                if s.writer is not None:
                    s.writer.close()

        asyncio.run_coroutine_threadsafe(_close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    # --- delivery ---
    def _send(self, s: Session, m: Message, qos: int, retain: bool = False, dup: bool = False) -> None:
        body = _encode_string(m.topic.encode())
        if qos:
            pid = s.pid()
            s.inflight[pid] = Message(m.topic, m.payload, qos)
            body += struct.pack("!H", pid)
        assert s.writer is not None
        s.writer.write(_packet(PUBLISH, (8 if dup else 0) | (qos << 1) | int(retain), body + m.payload))

    def _route(self, m: Message) -> None:
        if m.retain:
            if m.payload:
                self.retained[m.topic] = Message(m.topic, m.payload, m.qos, True)
            else:
                self.retained.pop(m.topic, None)
        for s in self.sessions.values():
            granted = [q for f, q in s.subscriptions.items() if topic_matches_sub(f, m.topic)]
            if not granted:
                continue
            qos = min(m.qos, max(granted))
            if s.writer is not None:
                self._send(s, m, qos)
            elif qos and s.persistent and len(s.queued) < MAX_QUEUED:
                s.queued.append(Message(m.topic, m.payload, qos))

    # --- one connection ---
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session: Session | None = None
        will: Message | None = None
        clean_exit = False
        try:
            kind, _, body = await asyncio.wait_for(_read_packet(reader), 10)
            if kind != CONNECT:
                return
            proto, i = _string(body, 0)
            level, flags, keepalive = body[i], body[i + 1], struct.unpack_from("!H", body, i + 2)[0]
            if proto != b"MQTT" or level != 4:
                writer.write(_packet(CONNACK, 0, b"\x00\x01"))  # unacceptable protocol version
                return
            cid_raw, i = _string(body, i + 4)
            cid = cid_raw.decode() or f"anon-{id(writer)}"
            if flags & 0x04:
                wt, i = _string(body, i)
                wp, i = _string(body, i)
                will = Message(wt.decode(), wp, min((flags >> 3) & 3, 1), bool(flags & 0x20))
            clean = bool(flags & 0x02)
            old = self.sessions.get(cid)
            if old is not None and old.writer is not None:
                old.writer.close()  # session takeover
                old.writer = None
            present = old is not None and not clean
            session = old if present else Session(cid, persistent=not clean)
            session.persistent = not clean
            self.sessions[cid] = session
            session.writer = writer
            writer.write(_packet(CONNACK, 0, bytes([int(present), 0])))
            for pid, m in list(session.inflight.items()):  # unacknowledged before: resend with DUP
                del session.inflight[pid]
                self._send(session, m, m.qos, dup=True)
            while session.queued:
                m = session.queued.popleft()
                self._send(session, m, m.qos)
            timeout = keepalive * 1.5 if keepalive else None
            while True:
                kind, flags, body = await asyncio.wait_for(_read_packet(reader), timeout)
                if kind == PUBLISH:
                    qos = (flags >> 1) & 3
                    topic, i = _string(body, 0)
                    if qos:
                        (pid,) = struct.unpack_from("!H", body, i)
                        i += 2
                    self._route(Message(topic.decode(), body[i:], min(qos, 1), bool(flags & 1)))
                    if qos:
                        writer.write(_packet(PUBACK, 0, struct.pack("!H", pid)))
                elif kind == PUBACK:
                    session.inflight.pop(struct.unpack_from("!H", body, 0)[0], None)
                elif kind == SUBSCRIBE:
                    (pid,) = struct.unpack_from("!H", body, 0)
                    i, granted, new = 2, [], []
                    while i < len(body):
                        f, i = _string(body, i)
                        q = min(body[i], 1)
                        i += 1
                        session.subscriptions[f.decode()] = q
                        granted.append(q)
                        new.append((f.decode(), q))
                    writer.write(_packet(SUBACK, 0, struct.pack("!H", pid) + bytes(granted)))
                    for f, q in new:
                        for m in list(self.retained.values()):
                            if topic_matches_sub(f, m.topic):
                                self._send(session, m, min(q, m.qos), retain=True)
                elif kind == UNSUBSCRIBE:
                    (pid,) = struct.unpack_from("!H", body, 0)
                    i = 2
                    while i < len(body):
                        f, i = _string(body, i)
                        session.subscriptions.pop(f.decode(), None)
                    writer.write(_packet(UNSUBACK, 0, struct.pack("!H", pid)))
                elif kind == PINGREQ:
                    writer.write(_packet(PINGRESP, 0, b""))
                elif kind == DISCONNECT:
                    clean_exit = True
                    return
                else:
                    raise ValueError(f"unsupported packet type {kind}")
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError, struct.error) as err:
            log.debug("client connection ended: %s", err)
        finally:
            if session is not None and session.writer is writer:
                session.writer = None
                if not session.persistent:
                    self.sessions.pop(session.client_id, None)
                if will is not None and not clean_exit:
                    self._route(will)
            with contextlib.suppress(Exception):
                writer.close()
