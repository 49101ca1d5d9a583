"""What every clip dataset shares: its common features, and finding a build under a data_dir."""
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds


def clip_features(**fields) -> tfds.features.FeaturesDict:
  """The fields every clip dataset has (video, fps, caption) plus the source's own `fields`.

  The loader reads these three from any source; video is a zlib Tensor because TFDS needs a
  byte encoding for two unknown dimensions or more, and its Video feature needs TensorFlow.
  """
  return tfds.features.FeaturesDict({
      "video": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8, encoding="zlib"),
      "fps": tfds.features.Scalar(dtype=np.float32),
      "caption": tfds.features.Text(),
      **fields,
  })


def load_built(data_dir, builder_cls, split: str = "train", config: str | None = None):
  """A random-access source of the clips `builder_cls` built in `data_dir` (for grain).

  Text fields come back as bytes. `config` names the option set (a directory under
  `<data_dir>/<builder name>/`); it may be left out when only one was built.
  """
  root, version = Path(data_dir, builder_cls.name), str(builder_cls.VERSION)
  built = sorted(p.parent for p in root.glob(f"{config or '*'}/{version}/dataset_info.json"))
  if len(built) != 1:
    names = [p.parent.parent.name for p in root.glob(f"*/{version}/dataset_info.json")]
    raise FileNotFoundError(
        f"expected one built dataset {config or ''} under {root}, found {names or 'none'}: "
        f"build it with {builder_cls.name}.build(), or pass config= one of those names")
  return tfds.builder_from_directory(built[0]).as_data_source(split)
