"""ingestd: stream text corpora into a KATO hierarchy, fast and exactly."""

__version__ = "0.1.0"
