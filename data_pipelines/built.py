"""Finding a built TFDS dataset of one of our builders under a data_dir."""
from pathlib import Path

import tensorflow_datasets as tfds


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
