"""vlp: vision-language pretraining on WebDataset shards, built on open_clip."""

__version__ = "0.1.0"
