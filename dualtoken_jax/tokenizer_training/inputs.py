"""Training inputs from `config.data` and `config.eval`: the sources a trainer can read.

config.data.source: "webdataset" (tar shards, e.g. CC12M: `path` may use {0000..2175}),
"folder" (recursive image folder), "array_record" (ArrayRecord files / TFDS-prepared data),
or "sample" (the photos bundled with installed packages; demos and tests).
"""

from __future__ import annotations

import numpy as np

from dualtoken_jax import data
from dualtoken_jax.data import decode
from dualtoken_jax.data import image_inputs

SOURCES = ("webdataset", "folder", "array_record", "sample")


def source(data_config):
  kind, path = data_config.source, data_config.path
  if kind not in SOURCES:
    raise ValueError(f"config.data.source must be one of {SOURCES}, got {kind!r}")
  if kind != "sample" and not path:
    raise ValueError(f"config.data.source={kind!r} needs config.data.path")
  max_bytes = data_config.get("max_image_bytes", decode.DEFAULT_MAX_BYTES)
  if kind == "webdataset":
    return data.WebDatasetSource(path, max_bytes=max_bytes)
  if kind == "folder":
    return data.ImageFolderSource(path, max_bytes=max_bytes)
  if kind == "array_record":
    return data.ArrayRecordSource(path, image_key=data_config.image_key,
                                  record_format=data_config.record_format)
  return data.SamplePhotosSource()


def train_iterator(config, per_host_batch: int):
  """This host's checkpointable, endlessly repeating training iterator."""
  ds = data.make_train_dataset(
      source(config.data), batch_size=per_host_batch, resolution=config.model.image_size,
      seed=config.seed, num_workers=config.data.num_workers,
      max_consecutive_skips=config.data.max_consecutive_skips)
  return iter(ds)


def eval_images(eval_config, size: int) -> np.ndarray:
  """A fixed set of images (eval geometry) whose reconstructions are scored and shown."""
  specs = [s for s in str(eval_config.images).split(",") if s]
  items = image_inputs.collect(specs)[:eval_config.num_images]
  batch = next(image_inputs.batches(items, size, len(items)))
  if not batch.keys:
    raise ValueError(f"none of the evaluation images could be read: {batch.skipped}")
  return batch.images
