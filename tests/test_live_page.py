"""The live page in real headless Chromium (Debian's ``chromium``, or Playwright's own build,
driven by Playwright)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest

from daemon.audio import WavFileSource
from daemon.config import AssemblyAIConfig, ReconnectConfig
from daemon.events import PartialTurn, SessionInfo, SessionSummary, TurnRecord
from daemon.live import LiveHub, Tee
from daemon.metrics import AudioMeter, StatusSnapshot
from daemon.stream import AssemblyAIEngine
from daemon.tokens import TokenProvider
from daemon.web import LiveServer
from tests.conftest import SPEECH_DIR, TRANSCRIPTS
from tests.fake_assemblyai import FakeAssemblyAI
from tests.fake_assemblyai_speech import load_speech_references
from tests.live_helpers import began, ended, live_server, partial, turn

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
S1 = "espeak-s1.wav"

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # pragma: no cover - depends on the environment
    async_playwright = None  # type: ignore[assignment]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium: Debian's, else Playwright's own build (where the distribution has no
    Chromium deb, as on Ubuntu, ``scripts/bootstrap.sh --dev`` installs that one); skipped
    locally when neither is there, a failure under CI."""
    if async_playwright is None:
        _missing("playwright (pip) is not installed")
    async with async_playwright() as playwright:
        executable = CHROMIUM if shutil.which(CHROMIUM) else None
        if executable is None and not Path(playwright.chromium.executable_path).exists():
            _missing("neither /usr/bin/chromium (apt) nor Playwright's Chromium is installed")
        launched = await playwright.chromium.launch(executable_path=executable,
                                                    args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


def _missing(what: str) -> NoReturn:
    """Skip (locally) or fail (under CI): the browser test needs a browser."""
    if os.environ.get("CI"):
        pytest.fail(f"{what}: required under CI (scripts/bootstrap.sh --dev installs it)")
    pytest.skip(what)


async def open_page(browser: Browser, url: str) -> tuple[Page, list[str]]:
    """A page at ``url`` with every request (HTTP and WebSocket) it makes recorded."""
    page = await browser.new_page(viewport={"width": 1000, "height": 640})
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on("websocket", lambda ws: requests.append(ws.url))
    await page.goto(url)
    return page, requests


def assert_same_origin(requests: list[str], server: LiveServer) -> None:
    """Every request the page made went to the daemon's own origin."""
    host = server.url.removeprefix("http://")
    assert requests, "the page made no request at all"
    outside = [u for u in requests if u.split("/")[2] != host or
               u.split(":")[0] not in ("http", "ws")]
    assert outside == []


class TestPage:
    async def test_partial_settles_into_final(self, browser: Browser, tmp_path: Path) -> None:
        """A partial turn updates in place, then settles into the final text with its time."""
        hub = LiveHub(engine="assemblyai")
        async with live_server(hub, poll_s=3600) as server:   # the test sets the state, not polls
            page, requests = await open_page(browser, server.url + "/")
            await expect(page.locator("#connection")).to_have_text("connecting")
            await expect(page.locator("#banner")).to_contain_text("Connecting to assemblyai")
            hub.session_started(began())
            hub.state(audio=True)
            await expect(page.locator("#connection")).to_have_text("live")
            await expect(page.locator("#session")).to_have_text("sess-0001-ab")
            await expect(page.locator("#banner")).to_be_hidden()
            hub.turn(turn(0, "Good morning."))
            hub.partial(partial(1, "the quick"))
            await expect(page.locator("#partial-text")).to_have_text("the quick")
            hub.partial(partial(1, "the quick brown fox"))
            await expect(page.locator("#partial-text")).to_have_text("the quick brown fox")
            await page.screenshot(path=str(tmp_path / "live-partial.png"))
            hub.turn(turn(1, "The quick brown fox."))
            turns = page.locator("#turns li .text")
            await expect(turns).to_have_text(["Good morning.", "The quick brown fox."])
            await expect(page.locator("#partial")).to_be_hidden()
            when = turn(1, "x").started_at.astimezone().strftime("%H:%M:%S")
            await expect(page.locator("#turns li time").nth(1)).to_have_text(when)
            shot = tmp_path / "live-page.png"
            await page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
            assert shot.stat().st_size > 5000
            assert_same_origin(requests, server)

    async def test_banners_and_feed_reconnect(self, browser: Browser, tmp_path: Path) -> None:
        """Reconnecting and backlog show a banner; a daemon that stops says so until it
        returns, and the page re-attaches then."""
        hub = LiveHub(engine="assemblyai")
        async with live_server(hub, poll_s=3600) as server:   # the test sets the state, not polls
            port = server.port
            page, requests = await open_page(browser, server.url + "/")
            hub.session_started(began())
            hub.turn(turn(0, "Before the drop."))
            await expect(page.locator("#turns li")).to_have_count(1)
            hub.session_ended(ended())
            hub.state(backlog_s=12.2)
            banner = page.locator("#banner")
            await expect(banner).to_have_text("Reconnecting to assemblyai — 12 s of audio held")
            await page.screenshot(path=str(tmp_path / "live-reconnecting.png"))
            hub.state("paused")
            await expect(banner).to_have_text(
                "Capture paused: reopening the microphone — 12 s of audio held")
        # it said it was stopping before it went: that, not a lost contact, stays on screen
        await expect(banner).to_have_text("The daemon has stopped — waiting for it to start "
                                          "again…")
        await expect(page.locator("#connection")).to_have_text("offline")
        async with live_server(hub, listen=f"127.0.0.1:{port}", poll_s=3600) as again:
            hub.state("live", session_id="sess-0002")
            await expect(page.locator("#connection")).to_have_text("live", timeout=10_000)
            hub.turn(turn(1, "After the drop."))
            await expect(page.locator("#turns li .text")).to_have_text(
                ["Before the drop.", "After the drop."])  # the replay is not duplicated
            assert_same_origin(requests, again)

    @pytest.mark.parametrize("token", ["page-token", "a+b/c=d", "p%ss"])
    async def test_token_from_page_url(self, browser: Browser, token: str) -> None:
        """The page opened with ?token= pasted as it is (a "+" too) passes it on to its feed."""
        hub = LiveHub(engine="local")
        async with live_server(hub, token=token) as server:
            page, _requests = await open_page(browser, server.url + "/?token=" + token)
            hub.session_started(SessionInfo("local-1", "local"))
            await expect(page.locator("#connection")).to_have_text("live")


class Recorder:
    """The app-side listener stand-in: keeps what the engine reported."""

    def __init__(self) -> None:
        self.turns: list[TurnRecord] = []
        self.partials: list[PartialTurn] = []
        self.sessions = 0
        self.live = False

    def turn(self, record: TurnRecord) -> None:
        self.turns.append(record)

    def partial(self, value: PartialTurn) -> None:
        self.partials.append(value)

    def session_started(self, session: SessionInfo) -> None:
        self.sessions += 1
        self.live = True

    def session_ended(self, summary: SessionSummary) -> None:
        self.live = False


async def test_wav_through_engine_live(browser: Browser, tmp_path: Path) -> None:
    """A WAV streamed through the real engine to the fake service shows live, then settles."""
    async with FakeAssemblyAI(load_speech_references(SPEECH_DIR, S1)) as fake, \
            httpx.AsyncClient() as client:
        config = AssemblyAIConfig(api_key=fake.api_key, streaming_url=fake.streaming_url,
                                  token_url=fake.token_url)
        engine = AssemblyAIEngine(
            config, ReconnectConfig(initial_delay=0.05, max_delay=0.2),
            TokenProvider(config, client), sample_rate=16000, chunk_ms=100, source="file",
            host="testhost",
        )
        recorder, hub, meter = Recorder(), LiveHub(engine="assemblyai"), AudioMeter()

        def status() -> StatusSnapshot:
            return StatusSnapshot(engine="assemblyai", engine_live=recorder.live,
                                  audio_seconds=meter.seconds, audio_age_s=meter.age(),
                                  sessions=recorder.sessions, turns=len(recorder.turns))

        async with LiveServer(hub, status, listen="127.0.0.1:0", poll_s=0.2) as server:
            page, requests = await open_page(browser, server.url + "/")
            await page.evaluate(_WATCH_PARTIALS)
            async with WavFileSource(SPEECH_DIR / S1, sample_rate=16000, chunk_ms=100) as source:
                running = asyncio.create_task(engine.run(meter.wrap(source.chunks()),
                                                         Tee(recorder, hub)))
                await expect(page.locator("#connection")).to_have_text("live")
                await expect(page.locator("#partial-text")).not_to_be_empty()  # mid-speech
                async with httpx.AsyncClient(base_url=server.url) as http:
                    health = await http.get("/healthz")
                    assert health.status_code == 200, health.text
                final = TRANSCRIPTS[S1]
                await expect(page.locator("#turns li .text")).to_have_text([final],
                                                                           timeout=15_000)
                await asyncio.wait_for(running, 15)
            hub.state("stopped")  # what the app says once the engine has returned
            await expect(page.locator("#banner")).to_have_text("The daemon has stopped.")
            seen: list[Any] = await page.evaluate("window.__partials")
            await page.screenshot(path=str(tmp_path / "live-engine.png"), full_page=True)
        assert seen, "no partial text was shown before the final"
        spoken = final.lower().rstrip(".").split()
        assert all(text.split() == spoken[:len(text.split())] for text in seen)
        assert [t.transcript for t in recorder.turns] == [final]
        assert_same_origin(requests, server)


# Runs in the page through DevTools (not a page script): records every partial text shown.
_WATCH_PARTIALS = """() => {
  window.__partials = [];
  const node = document.getElementById("partial-text");
  new MutationObserver(() => {
    const text = node.textContent;
    if (text && window.__partials[window.__partials.length - 1] !== text)
      window.__partials.push(text);
  }).observe(node, { childList: true, characterData: true, subtree: true });
}"""
