"""Input pipeline: image sources, PIL decoding, spec A.2 transforms, grain train/eval streams.

Typical trainer use:

  source = data.WebDatasetSource("/data/cc12m/cc12m-train-{0000..2175}.tar")
  per_host = data.host_batch_size(config.batch_size, mesh)
  train_ds = data.make_train_dataset(source, batch_size=per_host, resolution=384, seed=0)
  it = iter(train_ds)                      # checkpoint with it.get_state() / it.set_state()
  batch = next(it)
  images = data.make_global_array(batch["image"], mesh)   # f32[global, 384, 384, 3] in [-1, 1]
"""

from dualtoken_jax.data.decode import DEFAULT_MAX_PIXELS
from dualtoken_jax.data.decode import decode_image
from dualtoken_jax.data.decode import DecodeImage
from dualtoken_jax.data.decode import SkipImage
from dualtoken_jax.data.decode import to_rgb
from dualtoken_jax.data.global_batch import batch_sharding
from dualtoken_jax.data.global_batch import global_array_spec
from dualtoken_jax.data.global_batch import host_batch_size
from dualtoken_jax.data.global_batch import make_global_array
from dualtoken_jax.data.global_batch import make_global_batch
from dualtoken_jax.data.pipeline import eval_num_batches
from dualtoken_jax.data.pipeline import make_eval_dataset
from dualtoken_jax.data.pipeline import make_train_dataset
from dualtoken_jax.data.pipeline import SkipCountingIterator
from dualtoken_jax.data.records import SKIP_REASONS
from dualtoken_jax.data.sample_photos import SamplePhotosSource
from dualtoken_jax.data.sources import ArrayRecordSource
from dualtoken_jax.data.sources import ImageFolderSource
from dualtoken_jax.data.sources import RecordSource
from dualtoken_jax.data.transforms import EvalPreprocess
from dualtoken_jax.data.transforms import load_image
from dualtoken_jax.data.transforms import TrainPreprocess
from dualtoken_jax.data.webdataset import WebDatasetSource
