"""The Ray Data callable class that hosts one stage: error rows pass, failures stay per row.

A stage only ever sees rows that decoded fine and that earlier stages did not fail. If the stage
raises on a batch, the batch is retried row by row so one bad image cannot take its neighbours
down; a row that still fails gets ``error = "<stage>: <exception>"``. The output always has the
same rows as the input, with the stage's declared columns (``output_columns``, as its spec's
``output_columns()`` declares them; null for error rows), each cast to its declared type.

A stage that fails on ``failure_limit`` rows in a row is broken (a bad checkpoint, a bug, an
out-of-memory device), not fed bad images: then the actor raises :class:`StageFailed` and the job
fails with that error, keeping the shards it finished, instead of writing a dataset of error rows.
"""

from __future__ import annotations

import traceback

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema


class StageFailed(RuntimeError):
    pass


class StageActor:
    def __init__(
        self,
        *,
        stage_name: str,
        stage_cls: type,
        stage_kwargs: dict,
        output_columns: dict[str, pa.DataType],
        drop_columns: tuple[str, ...] = (),
        failure_limit: int = 0,
    ):
        self.name = stage_name
        self.failure_limit = failure_limit
        self.failures_in_a_row = 0
        _one_interop_thread()
        self.stage = stage_cls(**stage_kwargs)
        self.output_columns = dict(output_columns)
        self.drop_columns = drop_columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok_mask = pc.is_null(batch[schema.ERROR])
        ok, failed = batch.filter(ok_mask), batch.filter(pc.invert(ok_mask))
        parts = [self._run(ok)] if ok.num_rows else []
        if failed.num_rows:
            parts.append(self._with_null_outputs(failed))
        out = pa.concat_tables([self._shape(p, batch.schema) for p in parts])
        _release_free_memory()
        return out.drop_columns([c for c in self.drop_columns if c in out.column_names])

    def _run(self, rows: pa.Table) -> pa.Table:
        try:
            out = self.stage(rows)
            self.failures_in_a_row = 0
            return out
        except Exception as exc:  # noqa: BLE001 - any stage failure becomes an error row, never a lost row
            if rows.num_rows > 1:
                return pa.concat_tables(
                    [self._shape(self._run(rows.slice(i, 1)), rows.schema) for i in range(rows.num_rows)]
                )
            reason = f"{self.name}: {type(exc).__name__}: {exc}"
            last = traceback.extract_tb(exc.__traceback__)[-1:]
            if last:
                reason += f" (at {last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno})"
            self.failures_in_a_row += 1
            if self.failure_limit and self.failures_in_a_row >= self.failure_limit:
                raise StageFailed(
                    f"stage {self.name} failed on {self.failures_in_a_row} rows in a row "
                    f"(stage_failure_limit); last error: {reason}"
                ) from exc
            errors = pa.array([reason], pa.string())
            rows = rows.set_column(rows.column_names.index(schema.ERROR), schema.ERROR, errors)
            return self._with_null_outputs(rows)

    def _with_null_outputs(self, rows: pa.Table) -> pa.Table:
        for name, dtype in self.output_columns.items():
            if name not in rows.column_names:
                rows = rows.append_column(name, pa.nulls(rows.num_rows, dtype))
        return rows

    def _shape(self, table: pa.Table, input_schema: pa.Schema) -> pa.Table:
        """Input columns in input order, then the declared outputs, each cast to its declared type."""
        names = list(input_schema.names) + [n for n in self.output_columns if n not in input_schema.names]
        types = {**{f.name: f.type for f in input_schema}, **self.output_columns}
        return pa.Table.from_arrays([table[n].cast(types[n]) for n in names], names=names)


def _one_interop_thread() -> None:
    """One torch inter-op thread per actor, if the stage uses torch.

    An actor runs one batch at a time; its parallelism is the intra-op ``threads`` (the actor's
    share of the cores). Torch's default inter-op pool (one thread per core) only adds threads that
    compete with the other actors on the same cores. Must be set before torch runs anything.
    """
    import sys

    torch = sys.modules.get("torch")  # imported by the stage class's module (unpickled before this)
    if torch is None:
        return
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran in this process
        pass


def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def _release_free_memory() -> None:
    """Give the heap pages freed by the last batch back to the OS (glibc ``malloc_trim``).

    A model's activations are large, short-lived and sized by each image: glibc keeps the freed
    chunks in its heaps, and an actor's resident memory grows batch after batch (to ~2 GB for a
    small detector on 320 px images, measured in bench/throughput.py) although its live data stays
    the same. Trimming costs about a millisecond per batch.
    """
    if _TRIM is not None:
        _TRIM(0)
