"""Whether a server takes connections again: a TCP connect, no request.

A sink whose server could not be reached (refused, no route, a connect timeout) would otherwise
wait out a backoff that grows to 30 s (45 s jittered) in a long outage. The webhook sink's
``ready()`` and the MQTT sink's reconnect backoff probe the server's port instead, so turns go
within ``PROBE_EVERY_S`` of the server's return. A server behind a proxy is not probed (the proxy
would take the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from typing import Final

import httpx

PROBE_EVERY_S: Final = 2.0  # while the server cannot be reached, one TCP connect this often


def proxied(url: httpx.URL) -> bool:
    """Whether requests to ``url`` go through a proxy from the environment (as httpx's do)."""
    proxies = urllib.request.getproxies()
    if not (proxies.get(url.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(url.host)


async def connects(host: str, port: int, within: float) -> bool:
    """Whether a TCP connection to ``host:port`` is taken within ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def until_it_connects(host: str, port: int, timeout_s: float) -> None:
    """Probe ``host:port`` every ``PROBE_EVERY_S`` until a connection is taken.

    Each connect waits ``timeout_s`` (the sink's), never longer than the pace itself.
    """
    within = min(timeout_s, PROBE_EVERY_S)
    while True:
        if await connects(host, port, within):
            return
        await asyncio.sleep(PROBE_EVERY_S)     # a probe's pace, not a wait for an event
