"""Helpers shared by the commands: turning library errors into clean CLI failures, printing tables."""

from __future__ import annotations

import functools
import sys

import click

# Exceptions that mean "the user asked for something that cannot be done" (module -> class). They
# are looked up only when a command fails: importing their modules here would load torch and Ray
# for `pipeline --help`. A module that was never imported cannot have raised its exception.
USER_ERRORS = {
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
