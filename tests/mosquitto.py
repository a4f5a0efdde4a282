"""A real mosquitto broker for MQTT tests, plus a reconnecting subscriber and TLS test certs.

``Mosquitto(workdir)`` writes a config (listener on 127.0.0.1 and a free port, persistence on, so
a persistent subscriber session and its queued QoS 1 messages survive a broker restart), starts
``mosquitto -c`` and polls a TCP connect against a deadline. ``stop()``/``start()`` restart it on
the same port. Optional: a password file (``mosquitto_passwd -b``) and a TLS listener whose
certificates ``make_certs`` generates with the ``openssl`` CLI; an ACL (``acl_file`` text).
Without mosquitto the tests skip, except under ``CI`` where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import aiomqtt
import pytest

START_TIMEOUT_S = 10.0


def mosquitto_binary() -> str:
    """The mosquitto executable; skips the test when absent, fails when ``CI`` is set."""
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).is_file()),
        None,
    )
    if found is None:
        message = "mosquitto is not installed (apt install mosquitto)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Certs:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost."""

    ca: Path
    cert: Path
    key: Path


def make_certs(directory: Path) -> Certs:
    """Generate a CA and a server certificate signed by it (EC P-256, valid 2 days)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    cert, key, csr = directory / "server.crt", directory / "server.key", directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                   "extendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2",
             "-subj", "/CN=transcribed test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _openssl("req", "-new", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext)
    return Certs(ca, cert, key)


def _openssl(*args: str | Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        pytest.skip("the openssl CLI is needed to generate test certificates")
    subprocess.run([binary, *map(str, args)], check=True, capture_output=True, timeout=30)


class Mosquitto:
    """A mosquitto process on 127.0.0.1:``port``; restartable on the same port."""

    def __init__(self, workdir: Path, *, users: dict[str, str] | None = None,
                 certs: Certs | None = None, acl: str | None = None) -> None:
        self.binary = mosquitto_binary()
        self.workdir = workdir
        self.port = free_port()
        self.host = "127.0.0.1"
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._config(users, certs))
        if acl is not None:               # mosquitto's acl_file syntax (``topic read t/#``)
            (workdir / "acl").write_text(acl)
            with self.conf.open("a") as conf:
                conf.write(f"acl_file {workdir / 'acl'}\n")

    def _config(self, users: dict[str, str] | None, certs: Certs | None) -> str:
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"user {getpass.getuser()}",
            "persistence true",
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.log}",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
        ]
        if certs is not None:
            lines += [f"cafile {certs.ca}", f"certfile {certs.cert}", f"keyfile {certs.key}"]
        if users:
            passwd = self.workdir / "passwd"
            passwd.touch(mode=0o600)
            for name, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwd), name, password],
                               check=True, capture_output=True, timeout=30)
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        return "\n".join(lines) + "\n"

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the listener."""
        return self.host, self.port

    def start(self) -> None:
        """Start the broker and wait (bounded) until it accepts TCP connections."""
        self._proc = subprocess.Popen([self.binary, "-c", str(self.conf)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self._proc.returncode}: {err}")
            with contextlib.suppress(OSError), socket.create_connection(self.address, 0.2):
                return
            time.sleep(0.02)  # polling a TCP connect against a deadline, not synchronising
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} in {START_TIMEOUT_S} s")

    def stop(self) -> None:
        """Stop the broker cleanly (SIGTERM: it saves its persistence file)."""
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        self._proc = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class Subscriber:
    """A persistent-session QoS 1 subscriber that reconnects across broker restarts.

    Messages land in ``messages`` (an asyncio queue); ``subscribed`` is set after each SUBACK.
    """

    def __init__(self, broker: Mosquitto, topic: str, *, username: str | None = None,
                 password: str | None = None, tls_context: ssl.SSLContext | None = None) -> None:
        self.broker = broker
        self.topic = topic
        self._auth = (username, password)
        self._tls = tls_context
        self.client_id = f"test-sub-{os.getpid()}-{id(self)}"
        self.messages: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        async with asyncio.timeout(5):
            await self.subscribed.wait()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])

    async def next(self, within: float = 5.0) -> aiomqtt.Message:
        """The next message (waits up to ``within`` s)."""
        async with asyncio.timeout(within):
            return await self.messages.get()

    async def _run(self) -> None:
        while True:
            client = aiomqtt.Client(
                self.broker.host, self.broker.port, identifier=self.client_id,
                clean_session=False, username=self._auth[0], password=self._auth[1],
                tls_context=self._tls, timeout=5,
            )
            try:
                async with client:
                    await client.subscribe(self.topic, qos=1)
                    self.subscribed.set()
                    async for message in client.messages:
                        self.messages.put_nowait(message)
            except aiomqtt.MqttError:
                self.subscribed.clear()
                await asyncio.sleep(0.05)  # reconnect backoff while the broker restarts
