"""Running a `mixq` command: one line and an exit code for every failure, the result as a table or JSON, and
the signals that stop a run turned into exceptions so staging is removed on the way out.

Exit codes: 0 success; 1 bad input or a failed step (one line on stderr says what and where); 2 usage error;
3 a check that ran but missed its threshold; 130 interrupted (SIGINT), 143 terminated (SIGTERM), 129 hung up
(SIGHUP); 70 internal error (a bug: please report it).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import traceback

import click

from mixq.convert import progress
from mixq.convert.errors import MixqError

EXIT_INPUT, EXIT_THRESHOLD, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 3, 70, 130


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread like KeyboardInterrupt so staging is removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


def command(fn):
    """Run a command body: errors become one line and an exit code; the result is printed as table or JSON."""
    @functools.wraps(fn)
    def wrapper(*args, json_out: bool = False, quiet: bool = False, **kwargs):
        progress.set_quiet(quiet or json_out)
        try:
            result, render = fn(*args, **kwargs)
        except MixqError as exc:
            click.echo(f"mixq: error: {exc}", err=True)
            sys.exit(EXIT_INPUT)
        except click.ClickException:  # a usage error found by the command itself: click prints it, exit 2
            raise
        except KeyboardInterrupt:
            click.echo("mixq: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Terminated as exc:
            click.echo(f"mixq: terminated by {signal.Signals(exc.signum).name}", err=True)
            sys.exit(128 + exc.signum)
        except OSError as exc:  # the disk or the system refused (full, read-only, permissions): not a bug
            click.echo(f"mixq: error: {exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}",
                       err=True)
            sys.exit(EXIT_INPUT)
        except Exception as exc:  # a bug: one line, and the traceback on request
            if os.environ.get("MIXQ_DEBUG"):
                traceback.print_exc()
            click.echo(f"mixq: internal error: {type(exc).__name__}: {exc} (MIXQ_DEBUG=1 shows the traceback)",
                       err=True)
            sys.exit(EXIT_INTERNAL)
        if json_out:
            click.echo(json.dumps(result, indent=2, default=str))
        elif not quiet and render:
            click.echo(render(result))
        return result

    wrapper = click.option("--quiet", "-q", is_flag=True, help="No progress bars or summary.")(wrapper)
    return click.option("--json", "json_out", is_flag=True,
                        help="Print the result as JSON on stdout (implies --quiet).")(wrapper)


class Size(click.ParamType):
    """A byte count or a size such as 5GB or 2GiB; anything else is a usage error (exit 2)."""
    name = "size"

    def convert(self, value, param, ctx):
        from mixq.convert.hf import parse_size
        try:
            size = parse_size(value)
        except MixqError as exc:
            self.fail(str(exc), param, ctx)
        if size <= 0:
            self.fail(f"{value!r} is not a positive size", param, ctx)
        return size


SIZE = Size()


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP end a run as Ctrl-C does: through the cleanup of whatever is being written."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
