"""Logging: JSON lines, secrets masked everywhere, transcripts switch, stdlib bridge."""

from __future__ import annotations

import io
import json
import logging

import structlog

from daemon.logs import SecretMasker, configure


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
    structlog.get_logger("t").info("turn.completed", transcript="my secret plans")
    assert "my secret plans" not in out.getvalue()
    assert lines(out)[0]["transcript"] == "[hidden]"


def test_console_format() -> None:
    """format = console renders readable key=value lines."""
    out = io.StringIO()
    configure(fmt="console", stream=out)
    structlog.get_logger("t").info("session.began", session_id="abc")
    assert "session.began" in out.getvalue() and "session_id=abc" in out.getvalue()
