"""A Kafka-protocol proxy on loopback for the trust and network tests: TLS, SASL, faults.

It sits between Kafka clients and one broker (Tansu, started with ``advertised`` set to
the proxy, so every connection a client makes goes through it) and can:

- **terminate TLS**, as a load balancer in front of Kafka does: the broker certificate
  of `e2e.certs`, and with ``client_ca`` mutual TLS (a client certificate is required
  and must be signed by that CA). Tansu 0.6.0 cannot serve TLS itself (see
  `pipeline.kafka.broker`).
- **authenticate with SASL**, as a broker does (KIP-152: ``SaslHandshake`` then
  ``SaslAuthenticate``; PLAIN, RFC 4616, and SCRAM-SHA-256/512, RFC 5802/7677), before
  any other request is forwarded; a failed login gets ``SASL_AUTHENTICATION_FAILED``
  (58) and the connection is closed, as Kafka does. Tansu cannot keep SCRAM users.
- **fail the network**: add latency to every chunk, drop every connection, black-hole
  traffic for a while (connections stay open, nothing moves), or reset connections with
  TCP RSTs, mid-request.

Everything runs on one asyncio loop in a daemon thread; the public methods are
thread-safe. Only what the tests need of the protocol is parsed: request headers v1/v2
up to the client id, and the two SASL requests' bodies (v0 and v1).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import socket
import ssl
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from pipeline.kafka.broker import free_port

SASL_HANDSHAKE, SASL_AUTHENTICATE, API_VERSIONS = 17, 36, 18
UNSUPPORTED_SASL_MECHANISM, ILLEGAL_SASL_STATE, SASL_AUTHENTICATION_FAILED = 33, 34, 58
SCRAM_ITERATIONS = 4096
_HASHES = {"SCRAM-SHA-256": hashlib.sha256, "SCRAM-SHA-512": hashlib.sha512}


@dataclass
class Faults:
    """What the proxy does to traffic now (changed by `KafkaProxy`'s methods)."""

    latency_s: float = 0.0
    blackhole: asyncio.Event = field(default_factory=asyncio.Event)  # set: traffic flows


class KafkaProxy:
    """The proxy; start it, point the broker's ``advertised`` at `address`, stop it."""

    def __init__(
        self,
        upstream: str,
        *,
        port: int | None = None,
        cert: tuple[str, str] | None = None,
        client_ca: str | None = None,
        users: dict[str, str] | None = None,
        mechanisms: tuple[str, ...] = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
    ) -> None:
        host, _, up_port = upstream.rpartition(":")
        self._upstream = (host, int(up_port))
        self.port = port or free_port()
        self._tls: ssl.SSLContext | None = None
        if cert is not None:
            self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.load_cert_chain(*cert)
            if client_ca is not None:
                self._tls.verify_mode = ssl.CERT_REQUIRED
                self._tls.load_verify_locations(client_ca)
        self.users = users
        self.mechanisms = mechanisms
        self.logins: list[tuple[str, str, bool]] = []  # (mechanism, user, accepted)
        self.connections = 0  # accepted so far
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._faults: Faults | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        """host:port of the proxy, what clients (and the broker's metadata) name."""
        return f"127.0.0.1:{self.port}"

    # -- lifetime -------------------------------------------------------------------------

    def start(self) -> KafkaProxy:
        """Listen; returns at once, serving from the proxy's own thread."""
        self._thread.start()
        self._call(self._start())
        return self

    async def _start(self) -> None:
        self._faults = Faults()
        self._faults.blackhole.set()
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, ssl=self._tls, reuse_address=True
        )

    def stop(self) -> None:
        """Close every connection and stop listening."""
        if self._thread.is_alive():
            self._call(self._stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    async def _stop(self) -> None:
        assert self._server is not None
        assert self._faults is not None
        self._server.close()
        self._faults.blackhole.set()
        self._abort_all(reset=False)
        if self._tasks:  # aborted connections end their tasks; cancel what lingers
            _, lingering = await asyncio.wait(list(self._tasks), timeout=2.0)
            for task in lingering:
                task.cancel()

    def __enter__(self) -> KafkaProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- faults ---------------------------------------------------------------------------

    def set_latency(self, seconds: float) -> None:
        """Delay every chunk, both ways, by ``seconds`` (0: none)."""
        self._call(self._set(latency_s=seconds))

    async def _set(self, latency_s: float) -> None:
        assert self._faults is not None
        self._faults.latency_s = latency_s

    def blackhole(self, on: bool) -> None:
        """Stop moving bytes (connections stay open, new ones are accepted), or resume."""
        self._loop.call_soon_threadsafe(self._blackhole, on)

    def _blackhole(self, on: bool) -> None:
        assert self._faults is not None
        if on:
            self._faults.blackhole.clear()
        else:
            self._faults.blackhole.set()

    def drop(self, reset: bool = False) -> int:
        """Close every connection now (``reset``: with a TCP RST); how many there were."""
        return int(self._call(self._drop(reset)))

    async def _drop(self, reset: bool) -> int:
        return self._abort_all(reset)

    def _abort_all(self, reset: bool) -> int:
        links = list(self._links)
        for client, upstream in links:
            for writer in (client, upstream):
                if writer is None:
                    continue
                if reset:
                    sock = writer.get_extra_info("socket")
                    if sock is not None:
                        with contextlib.suppress(OSError):
                            sock.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                            )
                writer.transport.abort()
        self._links.clear()
        return len(links)

    @property
    def open_connections(self) -> int:
        """Client connections now open through the proxy."""
        return len(self._links)

    # -- one connection -------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        link: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None] = (writer, None)
        self._links.add(link)
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            self._links.discard(link)
            link = (writer, up_writer)
            self._links.add(link)
            if self.users is not None and not await self._login(
                reader, writer, up_reader, up_writer
            ):
                return
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._links.discard(link)
            for w in (writer, up_writer):
                if w is not None:
                    w.transport.abort()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        faults = self._faults
        assert faults is not None
        while True:
            chunk = await src.read(65536)
            if not chunk:
                dst.transport.abort()
                return
            await faults.blackhole.wait()
            if faults.latency_s:
                await asyncio.sleep(faults.latency_s)
            await faults.blackhole.wait()
            dst.write(chunk)
            await dst.drain()

    # -- SASL, as a broker does it --------------------------------------------------------

    async def _login(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> bool:
        """Answer the SASL exchange here; forward ApiVersions. True once logged in."""
        mechanism: str | None = None
        scram: _ScramServer | None = None
        while True:
            frame = await _read_frame(reader)
            api_key, version, correlation, body = _parse_request(frame)
            if api_key == API_VERSIONS:
                up_writer.write(frame)
                await up_writer.drain()
                writer.write(await _read_frame(up_reader))
                await writer.drain()
            elif api_key == SASL_HANDSHAKE:
                asked = _read_string(body, 0)[0]
                ok = asked in self.mechanisms
                mechanism = asked if ok else None
                names = b"".join(_string(m) for m in self.mechanisms)
                payload = struct.pack(
                    ">hi", 0 if ok else UNSUPPORTED_SASL_MECHANISM, len(self.mechanisms)
                )
                await _reply(writer, correlation, payload + names)
                if not ok:
                    return False
            elif api_key == SASL_AUTHENTICATE and mechanism is not None:
                size = struct.unpack_from(">i", body)[0]
                token = body[4 : 4 + size]
                if mechanism == "PLAIN":
                    _, user, password = ([*token.split(b"\x00"), b"", b""])[:3]
                    name = user.decode(errors="replace")
                    users = self.users or {}
                    accepted = users.get(name) == password.decode(errors="replace")
                    self.logins.append((mechanism, name, accepted))
                    await _auth_reply(writer, correlation, version, accepted, b"")
                    return accepted
                if scram is None:
                    scram = _ScramServer(mechanism, self.users or {})
                    await _auth_reply(writer, correlation, version, True, scram.first(token))
                    continue
                final = scram.final(token)
                self.logins.append((mechanism, scram.user, final is not None))
                await _auth_reply(writer, correlation, version, final is not None, final or b"")
                return final is not None
            else:  # anything else before logging in: a broker closes the connection
                return False


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(4)
    return head + await reader.readexactly(struct.unpack(">i", head)[0])


def _parse_request(frame: bytes) -> tuple[int, int, int, bytes]:
    """Api key, version, correlation id and body of a request (header v1: not flexible)."""
    api_key, version, correlation = struct.unpack_from(">hhi", frame, 4)
    client_len = struct.unpack_from(">h", frame, 12)[0]
    return api_key, version, correlation, frame[14 + max(client_len, 0) :]


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    size = struct.unpack_from(">h", data, pos)[0]
    return data[pos + 2 : pos + 2 + size].decode(), pos + 2 + size


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">h", len(raw)) + raw


async def _reply(writer: asyncio.StreamWriter, correlation: int, payload: bytes) -> None:
    body = struct.pack(">i", correlation) + payload
    writer.write(struct.pack(">i", len(body)) + body)
    await writer.drain()


async def _auth_reply(
    writer: asyncio.StreamWriter, correlation: int, version: int, ok: bool, token: bytes
) -> None:
    """SaslAuthenticate response v0/v1: error, message, auth bytes (v1: session lifetime)."""
    message = b"\xff\xff" if ok else _string("Authentication failed: invalid credentials")
    payload = struct.pack(">h", 0 if ok else SASL_AUTHENTICATION_FAILED) + message
    payload += struct.pack(">i", len(token)) + token
    if version >= 1:
        payload += struct.pack(">q", 0)
    await _reply(writer, correlation, payload)


class _ScramServer:
    """The server side of one SCRAM exchange (RFC 5802), with fresh salt per login."""

    def __init__(self, mechanism: str, users: dict[str, str]) -> None:
        self._hash = _HASHES[mechanism]
        self._users = users
        self.user = ""
        self._salt = os.urandom(16)
        self._nonce = ""
        self._first_bare = self._server_first = ""

    def _hmac(self, key: bytes, msg: bytes) -> bytes:
        return hmac.new(key, msg, self._hash).digest()

    def first(self, token: bytes) -> bytes:
        text = token.decode()
        self._first_bare = text.split(",", 2)[2]  # after the GS2 header "n,,"
        fields = dict(part.split("=", 1) for part in self._first_bare.split(","))
        self.user = fields["n"].replace("=2C", ",").replace("=3D", "=")
        self._nonce = fields["r"] + base64.b64encode(os.urandom(18)).decode()
        salt = base64.b64encode(self._salt).decode()
        self._server_first = f"r={self._nonce},s={salt},i={SCRAM_ITERATIONS}"
        return self._server_first.encode()

    def final(self, token: bytes) -> bytes | None:
        text = token.decode()
        without_proof, _, proof = text.rpartition(",p=")
        fields = dict(part.split("=", 1) for part in without_proof.split(","))
        password = self._users.get(self.user)
        if password is None or fields.get("r") != self._nonce:
            return None
        salted = hashlib.pbkdf2_hmac(
            self._hash().name, password.encode(), self._salt, SCRAM_ITERATIONS
        )
        client_key = self._hmac(salted, b"Client Key")
        stored = self._hash(client_key).digest()
        auth = f"{self._first_bare},{self._server_first},{without_proof}".encode()
        signature = self._hmac(stored, auth)
        sent = base64.b64decode(proof)
        if len(sent) != len(signature):
            return None
        recovered = bytes(a ^ b for a, b in zip(sent, signature, strict=True))
        if not hmac.compare_digest(self._hash(recovered).digest(), stored):
            return None
        server_sig = self._hmac(self._hmac(salted, b"Server Key"), auth)
        return b"v=" + base64.b64encode(server_sig)
