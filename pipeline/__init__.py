"""Ray-distributed batch vision pipeline: Parquet image shards in, predictions out."""

__version__ = "0.1.0"
