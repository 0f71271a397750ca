"""The `convo` console script (and `python -m convo`): the CLI, with Ctrl-C handled while it is
still starting. Importing the CLI's modules takes most of a second on a cold start, and a Ctrl-C
then printed Python's traceback; this module imports nothing heavy before its `try`."""

from __future__ import annotations

import sys

PROG = "convo"
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C, here and in the CLI once it runs


def main() -> int:
    try:
        from convo.cli import main as cli_main

        # (The CLI handles Ctrl-C itself once its parser is being built; this catches the
        # instant before, too.)
        return cli_main()
    except KeyboardInterrupt:
        try:
            sys.stderr.write(f"{PROG}: interrupted\n")
        except (OSError, ValueError):  # no terminal left to say it on
            pass
        return EXIT_INTERRUPTED
