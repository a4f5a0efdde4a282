"""``transcribed resend SINK``: a sink's dead-lettered turns sent again, in order.

Dead letters had no way back: once the receiver was fixed, the turns it had refused stayed in
``<state>/dead-letter/<sink>.jsonl`` for a person to replay by hand (and a signed webhook
cannot be replayed with curl). Real command, real HTTP server, real file sink.
"""

from __future__ import annotations

import json
from pathlib import Path

from daemon.deadletter import append_dead_letter
from tests.daemon_proc import read_turns, run_daemon
from tests.http_receiver import HttpReceiver, Reply
from tests.mosquitto import free_port
from tests.test_outbox import make_turn


def _config(tmp_path: Path, sinks: str) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f'[state]\ndir = "{tmp_path / "state"}"\n{sinks}')
    return config


def _dead_letters(tmp_path: Path, sink: str, *orders: int) -> Path:
    path = tmp_path / "state" / "dead-letter" / f"{sink}.jsonl"
    for order in orders:
        assert append_dead_letter(path, {"sink": sink, "error": "HTTP 400: Bad Request",
                                         "record": make_turn(order).to_dict()})
    return path


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["record"]["id"] for line in path.read_text().splitlines()]


async def test_turns_go_in_order_and_one_refused_again_stays(tmp_path: Path) -> None:
    async with HttpReceiver() as receiver:
        config = _config(tmp_path, f'[sinks.hook]\ntype = "webhook"\nurl = "{receiver.url}/in"\n')
        path = _dead_letters(tmp_path, "hook", 1, 2, 3)
        receiver.script(Reply(204), Reply(422), Reply(204))
        result = await run_daemon("resend", "hook", "--config", str(config))
    assert result.code == 1, result.stderr
    assert result.stdout == (f"hook: 2 resent, 1 kept in {path} (webhook {receiver.url} "
                             "answered 422 Unprocessable Entity)\n")
    sent = [json.loads(r.body)["data"]["id"] for r in receiver.received]
    assert sent == ["sess:1", "sess:2", "sess:3"]
    assert _ids(path) == ["sess:2"]
    [kept] = [json.loads(line) for line in path.read_text().splitlines()]
    assert "422" in kept["error"]                     # the reason of this run
    assert not path.with_name("hook.jsonl.resending").exists()
    assert result.stderr == ""


async def test_an_unreachable_sink_keeps_every_turn_in_order(tmp_path: Path) -> None:
    config = _config(tmp_path, '[sinks.hook]\ntype = "webhook"\n'
                     f'url = "http://127.0.0.1:{free_port()}/in"\n')
    path = _dead_letters(tmp_path, "hook", 1, 2, 3)
    result = await run_daemon("resend", "hook", "--config", str(config))
    assert result.code == 1
    assert result.stdout.startswith(f"hook: 0 resent, 3 kept in {path} (")
    assert _ids(path) == ["sess:1", "sess:2", "sess:3"]


async def test_a_file_sinks_turns_all_go(tmp_path: Path) -> None:
    journal = tmp_path / "turns.jsonl"
    config = _config(tmp_path, f'[sinks.journal]\ntype = "file"\npath = "{journal}"\n')
    path = _dead_letters(tmp_path, "journal", 1, 2)
    result = await run_daemon("resend", "journal", "--config", str(config))
    assert (result.code, result.stdout) == (0, "journal: 2 resent\n")
    assert [t["id"] for t in read_turns(journal)] == ["sess:1", "sess:2"]
    assert not path.exists()


async def test_nothing_to_resend_and_an_unknown_sink(tmp_path: Path) -> None:
    config = _config(tmp_path, f'[sinks.journal]\ntype = "file"\n'
                     f'path = "{tmp_path / "t.jsonl"}"\n')
    done = await run_daemon("resend", "journal", "--config", str(config))
    path = tmp_path / "state" / "dead-letter" / "journal.jsonl"
    assert (done.code, done.stdout) == (0, f"journal: nothing to resend ({path} is missing or "
                                           "empty)\n")
    unknown = await run_daemon("resend", "hook", "--config", str(config))
    assert unknown.code == 1
    assert unknown.stderr == ("transcribed resend: no sink named 'hook' in the config (its "
                              "sinks: journal)\n")
