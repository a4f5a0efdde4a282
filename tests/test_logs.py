"""Logging: JSON lines, secrets masked everywhere, transcripts switch, stdlib bridge."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import subprocess
from pathlib import Path

import pytest
import structlog

from daemon.logs import SecretMasker, configure
from tests.audio_samples import write_pcm16
from tests.conftest import REPO, TRANSCRIBED
from tests.daemon_proc import cloud_config, run_daemon
from tests.fake_assemblyai import FakeAssemblyAI


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


class TestMasking:
    def test_secrets_masked_in_fields_and_text(self) -> None:
        """A secret in any field, nested value or URL token never reaches the output."""
        out = io.StringIO()
        masker = configure(fmt="json", secrets=["sk-live-123456"], stream=out)
        masker.add_token("tok-abcdef")
        log = structlog.get_logger("t")
        log.info("x.happened", url="wss://h/v3/ws?sample_rate=1&token=tok-abcdef",
                 nested={"k": ["sk-live-123456"]}, note="key=sk-live-123456!")
        log.info("y.happened", url="ws://h/v3/ws?token=never-registered&a=1")
        text = out.getvalue()
        assert "sk-live-123456" not in text and "tok-abcdef" not in text
        assert "never-registered" not in text
        first = lines(out)[0]
        assert first["event"] == "x.happened" and first["level"] == "info"
        assert "timestamp" in first

    def test_only_recent_tokens_are_kept(self) -> None:
        """Weeks of sessions mint thousands of tokens; the masker keeps the recent ones only."""
        masker = SecretMasker(["sk-live-123456"], recent_tokens=3)
        for index in range(1000):
            masker.add_token(f"temporary-token-{index:04d}")
        text = "sk-live-123456 temporary-token-0999 temporary-token-0997 temporary-token-0000"
        assert masker.mask(text) == "******** ******** ******** temporary-token-0000"
        assert len(masker) == 4            # the key and three tokens, not 1001

    def test_exceptions_masked(self) -> None:
        """A traceback that mentions a secret is masked too."""
        out = io.StringIO()
        configure(fmt="json", secrets=["sk-live-123456"], stream=out)
        try:
            raise ValueError("bad key sk-live-123456")
        except ValueError:
            structlog.get_logger("t").exception("z.failed")
        assert "sk-live-123456" not in out.getvalue()
        assert "bad key" in out.getvalue()

    def test_stdlib_loggers_bridged_and_masked(self) -> None:
        """Library loggers (websockets, httpx) go through the same processors."""
        out = io.StringIO()
        configure(fmt="json", level="debug", secrets=["sk-live-123456"], stream=out)
        logging.getLogger("websockets.client").debug("> GET /v3/ws?token=abc sk-live-123456")
        record = lines(out)[0]
        assert "sk-live-123456" not in str(record) and "token=abc" not in str(record)


def test_transcripts_hidden_when_switched_off() -> None:
    """log.transcripts = false keeps transcript text out of every line."""
    out = io.StringIO()
    configure(fmt="json", transcripts=False, stream=out)
    structlog.get_logger("t").info("turn.completed", transcript="my secret plans", words=3)
    assert "my secret plans" not in out.getvalue()
    assert lines(out)[0]["transcript"] == "[hidden]"
    assert lines(out)[0]["words"] == 3      # a count stays a number (it became "[hidden]")


def test_console_format() -> None:
    """format = console renders readable key=value lines: the local time of day (the UTC
    instant to the microsecond took 28 columns), fields in the order the event gives them
    (sorted, a turn's id came before its words)."""
    out = io.StringIO()
    configure(fmt="console", stream=out)
    structlog.get_logger("t").info("turn.completed", transcript="Hi.", record_id="abc:1")
    line = out.getvalue()
    assert re.fullmatch(r"\d\d:\d\d:\d\d \[info +\] turn\.completed +transcript=Hi\. "
                        r"record_id=abc:1\n", line), line


class TestMaskingWhatTheConfigDoesNotList:
    def test_tracebacks_masked_before_json_escapes_them(self) -> None:
        """A secret with a quote, a backslash or a non-ASCII letter is masked in a traceback
        too, of ours or a library's: JSON would escape it before a masker of the line saw it."""
        for secret in ('pw"with-quote', "pw\\with-backslash", "pässwort-7"):
            out = io.StringIO()
            configure(fmt="json", level="debug", secrets=[secret], stream=out)
            try:
                raise RuntimeError(f"refused {secret}")
            except RuntimeError:
                structlog.get_logger("t").exception("z.failed")
                logging.getLogger("lib").exception("lib.failed")
            records = lines(out)
            assert len(records) == 2
            for record in records:
                assert secret not in str(record["exception"]), record
                assert "RuntimeError: refused ********" in str(record["exception"])

    async def test_service_url_credentials_never_logged(self, tmp_path: Path) -> None:
        """User info in ``assemblyai.streaming_url`` / ``token_url`` is masked at debug level:
        httpx's request line, websockets' handshake (``Authorization: Basic …``) and the
        token error, and so is a query of the streaming URL."""
        wav = write_pcm16(tmp_path / "quiet.wav", bytes(2 * 4000))
        async with FakeAssemblyAI() as fake:
            config = cloud_config(tmp_path, fake, wav)
            text = config.read_text()
            host = f"127.0.0.1:{fake.port}"
            streaming = text.replace(f'"ws://{host}/v3/ws"',
                                     f'"ws://usr:pw-url-secret-5@{host}/v3/ws?q-url-secret-6"')
            config.write_text(streaming)
            streamed = await run_daemon("run", "--config", str(config), limit_s=30)
            config.write_text(text.replace(f'"http://{host}/v3/token"',
                                           f'"http://usr:pw-url-secret-7@{host}/v3/token"'))
            refused = await run_daemon("run", "--config", str(config), limit_s=30)
        assert streamed.code == 0, streamed.stderr
        assert refused.code == 77, refused.stderr
        basic = base64.b64encode(b"usr:pw-url-secret-5").decode()
        assert "> Authorization: Basic ********" in streamed.stderr
        assert "HTTP Request: GET http://********@127.0.0.1" in refused.stderr
        for secret in ("pw-url-secret-5", "q-url-secret-6", basic, "pw-url-secret-7"):
            assert secret not in streamed.stderr + streamed.stdout + refused.stderr, secret

    def test_authorization_headers_masked(self) -> None:
        """An ``Authorization`` header in a log line is masked, its scheme kept."""
        masker = SecretMasker()
        assert masker.mask("> Authorization: Bearer abc.def-1") == \
            "> Authorization: Bearer ********"
        assert masker.mask("{'authorization': 'xyz123'}") == "{'authorization': '********'}"
        assert masker.mask("see https://u:p@h.example/x and mailto:a@b") == \
            "see https://********@h.example/x and mailto:a@b"
        assert masker.mask("http://h.example/p?email=a@b") == "http://h.example/p?email=a@b"


class TestForAPersonTailing:
    """``journalctl -f`` shows a JSON line as it is: the event came after every field, and
    journald stored every line at priority 6 (info), so ``journalctl -p err`` found nothing."""

    def test_a_json_line_starts_with_its_event_and_level(self) -> None:
        out = io.StringIO()
        configure(fmt="json", stream=out)
        structlog.get_logger("t").warning("sink.send_failed", sink="hook", error="refused")
        assert out.getvalue().startswith('{"event": "sink.send_failed", "level": "warning", ')

    def test_lines_to_the_journal_carry_their_priority(self, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
        with (tmp_path / "journal").open("w") as journal:
            held = os.fstat(journal.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", f"{held.st_dev}:{held.st_ino}")
            configure(fmt="json", stream=journal)
            log = structlog.get_logger("t")
            log.info("daemon.ready")
            log.warning("sink.send_failed")
            log.error("sink.turn_lost")
            logging.getLogger("websockets").error("from a library")
        lines = (tmp_path / "journal").read_text().splitlines()
        assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>", "<3>"]
        assert [json.loads(line[3:])["level"] for line in lines] == [
            "info", "warning", "error", "error"]

    def test_no_priority_elsewhere(self, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
        """A journal named by the environment that is not this stream (a child of the unit
        writing to a file or a pipe of its own) gets plain lines."""
        monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
        with (tmp_path / "log").open("w") as elsewhere:
            configure(fmt="json", stream=elsewhere)
            structlog.get_logger("t").error("sink.turn_lost")
        assert (tmp_path / "log").read_text().startswith('{"event": "sink.turn_lost"')


def test_why_a_command_failed_carries_its_priority_to_the_journal(tmp_path: Path) -> None:
    """A config error at start is said in plain lines, not through the loggers: under systemd
    they were stored at info, and ``journalctl -p warning`` did not show why the daemon would
    not start."""
    config = tmp_path / "c.toml"
    config.write_text("[audio]\nchunk_ms = 5\nbogus = 1\n")
    with (tmp_path / "journal").open("w") as journal:
        held = os.fstat(journal.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{held.st_dev}:{held.st_ino}"}
        done = subprocess.run([*TRANSCRIBED, "check-config", "--config", str(config)],
                              cwd=REPO, stderr=journal, env=env, timeout=60, check=False)
    assert done.returncode == 78
    lines = (tmp_path / "journal").read_text().splitlines()
    assert len(lines) == 2 and all(line.startswith("<3>transcribed: config error: ")
                                   for line in lines), lines
