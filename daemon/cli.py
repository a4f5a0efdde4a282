"""Command line: argument parsing, exit codes, and nothing else.

Heavy modules are imported inside the commands so ``transcribed --version`` stays instant.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import Final

from daemon import __version__

EX_OK: Final = 0
EX_FAILURE: Final = 1
EX_CONFIG: Final = 78
EX_INTERRUPTED: Final = 130

_DESCRIPTION: Final = """\
Always-on speech to text: captures the microphone (or a WAV file), transcribes it with
AssemblyAI Universal Streaming v3 or the embedded offline engine, and hands every finished
turn to the configured sinks (file, console, webhook, MQTT, third-party).

Config lookup without --config: $TRANSCRIBED_CONFIG, $XDG_CONFIG_HOME/transcribed/config.toml,
/etc/transcribed/config.toml, else built-in defaults. Any key can be overridden with
TRANSCRIBED_<SECTION>__<KEY>, e.g. TRANSCRIBED_ASSEMBLYAI__API_KEY_FILE.

Exit codes: 0 done, 1 unexpected failure, 2 command line not understood, 77 credentials
rejected, 78 configuration error, 130 interrupted (Ctrl-C) before it could stop cleanly."""

# each command's --help page opens with what it does (README.md's "Commands" table)
_ABOUT: Final = {
    "run": "Run the daemon in the foreground (what systemd starts): transcribe the microphone "
           "and hand every finished turn to the sinks. With audio.source = \"file\" it streams "
           "the WAV file at real-time pace, delivers every turn, then exits 0.",
    "check-config": "Validate the config and print the effective config with every secret "
                    "masked. Exit 0, or 78 with one line per problem, all of them in one run.",
    "devices": "List audio input devices: index, name, default sample rate, channels, and which "
               "is the default. audio.device is an index or a case-insensitive part of a name.",
    "test-sinks": "Send one synthetic turn through every enabled sink and report, one line per "
                  "sink, delivered, the error, or skipped (a disabled sink); exit 0 when every "
                  "sink delivered, else 1. The turn lands where real turns do, marked "
                  "\"source\": \"test\".",
    "tail": "Attach to the running daemon and show the live transcript (partials in place, "
            "finals committed), or every event as a JSON line. The daemon is found from the "
            "config's [http] listen and token.",
    "resend": "Send a sink's dead-lettered turns (<state dir>/dead-letter/<SINK>.jsonl) again, "
              "in order, once what refused them is fixed. A turn delivered leaves the file; one "
              "refused again stays with its new reason; a sink that cannot be reached ends the "
              "run, and the rest stays. Exit 0 when none is left, else 1. Safe while the daemon "
              "runs.",
    "install-service": "Write the systemd unit (one that differs is kept as "
                       "transcribed.service.bak; and an example config if none) and print the "
                       "systemctl commands to run.",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transcribed",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"transcribed {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    lookup = ("default: $TRANSCRIBED_CONFIG, $XDG_CONFIG_HOME/transcribed/config.toml, "
              "/etc/transcribed/config.toml, else built-in defaults")
    config_help = f"config file ({lookup})"
    run = commands.add_parser("run", help="run the daemon in the foreground (what systemd starts)")
    run.add_argument("--config", metavar="PATH", help=config_help)
    check = commands.add_parser(
        "check-config", help="validate the config and print it with secrets masked (exit 0 or 78)"
    )
    check.add_argument("--config", metavar="PATH", help=config_help)
    commands.add_parser("devices", help="list audio input devices")
    sinks = commands.add_parser(
        "test-sinks", help="send one synthetic turn through every enabled sink and report"
    )
    sinks.add_argument("--config", metavar="PATH", help=config_help)
    tail = commands.add_parser(
        "tail", help="show the running daemon's live transcript (partials in place, finals "
        "committed)"
    )
    tail.add_argument("--config", metavar="PATH", help="the daemon's config file, whose [http] "
                      f"listen and token say where it is ({lookup})")
    tail.add_argument("--json", action="store_true", help="print every feed event as a JSON line")
    tail.add_argument("--retry", action="store_true",
                      help="when the daemon stops or cannot be reached, wait for it and "
                      "reconnect (turns already shown are not shown again)")
    again = commands.add_parser(
        "resend", help="send a sink's dead-lettered turns again, once what refused them is fixed")
    again.add_argument("sink", metavar="SINK", help="the sink's name ([sinks.SINK])")
    again.add_argument("--config", metavar="PATH", help=config_help)
    install = commands.add_parser(
        "install-service",
        help="write the systemd unit (and an example config if none) and print what to run",
    )
    scope = install.add_mutually_exclusive_group()
    scope.add_argument("--user", dest="system", action="store_false",
                       help="user unit in ~/.config/systemd/user (default)")
    scope.add_argument("--system", dest="system", action="store_true",
                       help="hardened system unit in /etc/systemd/system (run as root)")
    install.set_defaults(system=False)
    install.add_argument("--root", metavar="DIR",
                         help="install below DIR instead of / (for images and tests)")
    for name, command in commands.choices.items():
        command.description = _ABOUT[name]
        command.set_defaults(command_parser=command)    # who reports an option it does not know
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``transcribed`` console script.

    Output cut short by its reader (``transcribed check-config | head``) ends it quietly, with
    no traceback: the command's own exit code if it had finished, else 1 (as a program killed
    by SIGPIPE fails), so a failure is never reported as success. ``tail`` handles this itself
    and exits 0. Ctrl-C where no command handles it (``run`` does once it is up, ``tail``
    always) is one line and exit 130, as a shell reports a program stopped by SIGINT.
    """
    code = 1
    try:
        code = _run(argv)
        if sys.stdout is not None:      # None: started with stdout closed (>&-)
            sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
    except KeyboardInterrupt:           # Ctrl-C where nothing handles it (run: while starting)
        from daemon import logs

        # a stderr gone or stalled changes nothing: the exit code is still 130
        logs.say("transcribed: interrupted", priority=4)
        code = EX_INTERRUPTED
    return code


def _run(argv: Sequence[str] | None) -> int:
    args, unknown = _parser().parse_known_args(argv)
    if unknown:     # the command's usage, not the top level's (argparse leaves them to it)
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "run":   # until app.run handles it, from before the imports (~0.3 s):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)    # a SIGHUP while starting killed it
    from daemon import commands

    handlers = {
        "run": commands.run,
        "check-config": commands.check_config,
        "devices": commands.devices,
        "test-sinks": commands.test_sinks,
        "tail": commands.tail,
        "resend": commands.resend,
        "install-service": commands.install_service,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
