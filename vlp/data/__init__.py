"""The data layer: shard writing (:mod:`.writer` from :mod:`.sources`), shard lists and tar reading
(:mod:`.shards`), and streaming batches (:mod:`.stream`, with :mod:`.preprocess`)."""
from vlp.data.preprocess import BadSample, ImageDecoder, ImageOptions
from vlp.data.shards import Shard, ShardSpecError, expand, iter_raw_samples
from vlp.data.stream import Loader, ShardStream, Source, StreamOptions
from vlp.data.writer import WriterOptions, write_shards

__all__ = ["BadSample", "ImageDecoder", "ImageOptions", "Shard", "ShardSpecError", "expand", "iter_raw_samples",
           "Loader", "ShardStream", "Source", "StreamOptions", "WriterOptions", "write_shards"]
