"""Helpers shared by the commands: turning library errors into clean CLI failures, printing tables."""

from __future__ import annotations

import functools

import click

from pipeline.config.load import ConfigError
from pipeline.coordinator.submit import SubmitError
from pipeline.data.importers import DataImportError
from pipeline.data.shards import DatasetError
from pipeline.eval.params import EvalInputError
from pipeline.models.weights import WeightsError

USER_ERRORS = (ConfigError, DataImportError, DatasetError, EvalInputError, SubmitError, WeightsError)


def user_errors(fn):
    """Show expected failures (bad config, missing file...) as one clear line, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            raise click.ClickException(str(exc)) from exc

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
