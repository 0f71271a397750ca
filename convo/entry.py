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
    except KeyboardInterrupt as e:
        # SIGTERM and SIGHUP reach here as the CLI's KeyboardInterrupt subclass, with a signum.
        signum = getattr(e, "signum", None)
        said = f"terminated by signal {signum}" if signum else "interrupted"
        try:
            if sys.stderr is not None:
                sys.stderr.write(f"{PROG}: {said}\n")
        except (OSError, ValueError):  # no terminal left to say it on
            pass
        return 128 + signum if signum else EXIT_INTERRUPTED
