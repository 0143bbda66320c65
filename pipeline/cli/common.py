"""Helpers shared by the commands: turning library errors into clean CLI failures, printing tables."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import threading

import click

# Exceptions that mean "the user asked for something that cannot be done" (module -> class). They
# are looked up only when a command fails: importing their modules here would load torch and Ray
# for `pipeline --help`. A module that was never imported cannot have raised its exception.
USER_ERRORS = {
    "pipeline.annotate": "AnnotationError",
    "pipeline.config.load": "ConfigError",
    "pipeline.coordinator.submit": "SubmitError",
    "pipeline.data.importers": "DataImportError",
    "pipeline.data.shards": "DatasetError",
    "pipeline.eval.params": "EvalInputError",
    "pipeline.models.weights": "WeightsError",
}


def user_error_types() -> tuple[type[Exception], ...]:
    return tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS.items() if module in sys.modules)


def user_errors(fn):
    """Show expected failures (bad config, missing file...) as one clear line, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if isinstance(exc, user_error_types()):
                raise click.ClickException(str(exc)) from exc
            raise

    return wrapper


def report_unreadable(errors: list[str]) -> None:
    """The images an import kept as error rows: the first 10 reasons, then how many more."""
    if errors:
        click.echo(f"{len(errors)} image(s) could not be read; kept as error rows:", err=True)
        for line in errors[:10]:
            click.echo(f"  {line}", err=True)
        if len(errors) > 10:
            click.echo(f"  ... and {len(errors) - 10} more", err=True)


def print_table(rows: list[tuple], header: tuple | None = None) -> None:
    """Left-aligned text columns; numbers right-aligned."""
    all_rows = ([header] if header else []) + [tuple(str(c) for c in r) for r in rows]
    if not all_rows:
        return
    widths = [max(len(str(r[i])) for r in all_rows) for i in range(len(all_rows[0]))]
    for n, row in enumerate(all_rows):
        cells = [
            str(c).rjust(w) if _is_number(c) and n > 0 else str(c).ljust(w) for c, w in zip(row, widths)
        ]
        click.echo("  ".join(cells).rstrip())
        if header and n == 0:
            click.echo("  ".join("-" * w for w in widths))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# Lines Ray prints on every run that read like errors but need no action. Each with its reason:
RAY_NOISE = (
    # Ray Data's own actor pool passes an internal handle to every actor it starts, so core_worker
    # warns about constructor arguments in the object store for any map_batches class, even one
    # without arguments (ray-project/ray#57733, open); our stage actors rebuild from their spec.
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store and max_restarts > 0"),
    # Ray 2.60 turns token authentication on by default and says so at every ray.init; nothing to
    # do for an embedded Ray (no dashboard), and "Run on a cluster" in the README covers clusters.
    re.compile(rb"WARNING authentication_token_setup\.py:\d+ -- Token authentication is enabled for this Ray cluster"),
)


@contextlib.contextmanager
def filtered_stderr(patterns=RAY_NOISE):
    """Drop whole lines matching ``patterns`` from this process's stderr (file descriptor 2).

    Ray's C++ core worker writes to the descriptor directly, so ``sys.stderr`` cannot catch it: fd 2
    is pointed at a pipe that a thread copies back, line by line, without the matching lines.
    Progress bars (``\\r`` without a newline) pass through at once.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. an embedding that closed it)
        yield
        return
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def copy() -> None:
        pending = b""
        while chunk := os.read(read_fd, 65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not any(p.search(line) for p in patterns))
            if b"\r" in pending:  # a progress bar redrawing its line: show it now
                cut = pending.rindex(b"\r") + 1
                out, pending = out + pending[:cut], pending[cut:]
            if out:
                os.write(saved, out)
        if pending:
            os.write(saved, pending)

    thread = threading.Thread(target=copy, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's write end is now held only by Ray processes started meanwhile
        thread.join(timeout=1)  # drained once they have exited (ray.shutdown); else it ends with us
        if not thread.is_alive():
            os.close(read_fd)
            os.close(saved)
