"""``pipeline``: the command line. Commands only parse options and delegate to the library."""

from __future__ import annotations

import click

from pipeline import __version__
from pipeline.cli.annotate import export_coco_cmd, export_labelstudio_cmd, export_yolo_cmd, import_labelstudio_cmd, merge_cmd
from pipeline.cli.data import data
from pipeline.cli.eval import eval_cmd, eval_generative_cmd
from pipeline.cli.generate import generate
from pipeline.cli.jobs import jobs, submit
from pipeline.cli.review import review_cmd
from pipeline.cli.run import run
from pipeline.cli.train_style import train_style
from pipeline.cli.train import train


@click.group(context_settings={"help_option_names": ["-h", "--help"], "terminal_width": 100, "max_content_width": 100})
@click.version_option(__version__, prog_name="pipeline")
def main() -> None:
    """Batch vision jobs over Parquet image shards, on embedded Ray or a Ray cluster."""


main.add_command(data)
main.add_command(run)
main.add_command(eval_cmd)
main.add_command(eval_generative_cmd)
main.add_command(train)
main.add_command(train_style)
main.add_command(generate)
main.add_command(submit)
main.add_command(jobs)
main.add_command(review_cmd)
data.add_command(export_coco_cmd)
data.add_command(export_yolo_cmd)
data.add_command(export_labelstudio_cmd)
data.add_command(import_labelstudio_cmd)
data.add_command(merge_cmd)
