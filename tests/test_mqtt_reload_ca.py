"""A CA certificate renewed at the same ``ca_file`` path is a changed MQTT sink for a reload.

Only the path was compared: renewing the CA in place and sending SIGHUP (the usual rotation
step) rebuilt nothing, and the sink trusted the old CA until a restart, failing every connect
to a broker that presents a certificate of the new one.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import ssl
import tomllib
import wave
from pathlib import Path

import pytest

from daemon.commands import check_config
from daemon.plugins import load_plugins
from daemon.reload import SinkBuilder, plan_sinks
from daemon.runner import SinkRunner
from daemon.sinktables import ValidatedSinks, validate_sinks
from plugins.mqtt import MqttConfig
from tests.daemon_proc import Daemon, cloud_config
from tests.fake_assemblyai import FakeAssemblyAI
from tests.mosquitto import Certs, Mosquitto, Subscriber, make_certs
from tests.notify_socket import NotifySocket

STATUS = "transcribed/+/status"


def _install(certs: Certs, into: Certs) -> None:
    """Copy ``certs``' files over ``into``'s paths (a renewal in place)."""
    for source, target in ((certs.ca, into.ca), (certs.cert, into.cert), (certs.key, into.key)):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def _silence(path: Path, seconds: int) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(bytes(2 * 16000 * seconds))
    return path


def _mqtt_table(port: int, ca: Path) -> str:
    return (f'[sinks.bus]\ntype = "mqtt"\nhost = "127.0.0.1"\nport = {port}\ntls = true\n'
            f'ca_file = "{ca}"\ntimeout_s = 2\n')


async def _live_online(status: Subscriber) -> None:
    """Wait for an ``online`` published now (not the retained one a subscription gets)."""
    while True:
        message = await status.next(within=10)
        if message.payload == b"online" and not message.retain:
            return


# paho-mqtt 2.2 does not close its SSLSocket when the handshake fails (test_mqtt.py): the old
# sink's connects to the broker with the renewed certificate fail until the reload
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*SSLSocket:pytest.PytestUnraisableExceptionWarning"
)
async def test_sighup_after_renewing_the_ca_in_place_rebuilds_the_sink(tmp_path: Path) -> None:
    """Broker certificate and CA renewed (the CA at the same ca_file path), broker restarted,
    SIGHUP: the sink is rebuilt and connects with the new CA. A second SIGHUP, nothing
    changed, keeps it. Before, the reload kept the sink and it never connected again."""
    old, new = make_certs(tmp_path / "old"), make_certs(tmp_path / "new")
    served = Certs(*(tmp_path / "served" / name for name in ("ca.crt", "server.crt",
                                                            "server.key")))
    trusted = tmp_path / "trusted" / "ca.pem"
    _install(old, served)
    trusted.parent.mkdir()
    shutil.copyfile(old.ca, trusted)
    wav = _silence(tmp_path / "silence.wav", 60)
    with Mosquitto(tmp_path / "broker", certs=served) as broker:
        async with FakeAssemblyAI() as fake, \
                NotifySocket.listening(tmp_path / "notify.sock") as sock:
            config = cloud_config(tmp_path, fake, wav, sinks=_mqtt_table(broker.port, trusted))
            daemon = await Daemon.start("run", "--config", str(config), env=sock.env())
            try:
                async with asyncio.timeout(20):
                    async with Subscriber(broker, STATUS, tls_context=ssl.create_default_context(
                            cafile=str(old.ca))) as status:
                        while (await status.next(within=10)).payload != b"online":
                            pass                            # the sink is connected (old CA)
                    ready = await sock.wait_for(lambda m: "READY" in m)
                    _install(new, served)                   # the renewal, in place
                    shutil.copyfile(new.ca, trusted)
                    await asyncio.to_thread(broker.stop)
                    await asyncio.to_thread(broker.start)   # presents the new certificate
                    async with Subscriber(broker, STATUS, tls_context=ssl.create_default_context(
                            cafile=str(new.ca))) as status:
                        daemon.signal(signal.SIGHUP)
                        first = await sock.wait_for(
                            lambda m: "reload applied" in m.fields.get("STATUS", ""),
                            after=ready + 1)
                        await _live_online(status)          # the rebuilt sink connected
                    daemon.signal(signal.SIGHUP)
                    await sock.wait_for(lambda m: "reload applied" in m.fields.get("STATUS", ""),
                                        after=first + 1)
                daemon.signal(signal.SIGTERM)
                result = await daemon.finish(30)
            finally:
                await daemon.kill_if_running()
    assert result.code == 0, result.stderr
    renewed, unchanged = result.events("reload.applied")
    assert (renewed["changed"], renewed["kept"]) == (["bus"], [])
    assert (unchanged["changed"], unchanged["kept"]) == ([], ["bus"])


def _running(sinks: ValidatedSinks, state: Path) -> dict[str, SinkRunner]:
    """Runners as the dispatcher holds them (built by the daemon's builder, never started)."""
    builder = SinkBuilder("h", state)
    return {name: builder.build(name, kind, config) for name, (kind, config) in sinks.items()}


def _validated(ca: Path) -> ValidatedSinks:
    return validate_sinks(load_plugins(entry_points=False), {"bus": {
        "type": "mqtt", "host": "127.0.0.1", "tls": True, "ca_file": str(ca)}})


def test_plan_compares_the_ca_files_contents_not_its_path(tmp_path: Path) -> None:
    """Renewed in place: changed. Written again with the same bytes (a newer mtime): kept."""
    old, new = make_certs(tmp_path / "old"), make_certs(tmp_path / "new")
    ca = tmp_path / "ca.pem"
    shutil.copyfile(old.ca, ca)
    running = _running(_validated(ca), tmp_path)
    ca.write_bytes(old.ca.read_bytes())
    assert plan_sinks(running, _validated(ca)).kept == ("bus",)
    shutil.copyfile(new.ca, ca)
    assert plan_sinks(running, _validated(ca)).changed == ("bus",)


def test_check_config_prints_no_digest(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """check-config's effective config shows the keys a user can set, nothing more."""
    ca = make_certs(tmp_path / "certs").ca
    path = tmp_path / "c.toml"
    path.write_text(_mqtt_table(8883, ca))
    assert check_config(argparse.Namespace(config=str(path))) == 0
    printed = capsys.readouterr().out
    bus = tomllib.loads(printed)["sinks"]["bus"]
    assert set(bus) == set(MqttConfig.model_fields) and bus["ca_file"] == str(ca)
    assert "digest" not in printed
