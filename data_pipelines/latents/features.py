"""The latent dataset's feature spec: the source's, with `video` swapped for `latent`.

A TFDS source (what `as_data_source()` returns) carries its spec in `dataset_info.features`;
every field but `video` is copied from it (through its JSON form, so nothing is shared with
the source's builder). Per-frame fields keep their spec, except that a fixed frame count
becomes unknown (clips are cut to 1 + 4k frames). A source without a spec (ShapesSource, a
list of dicts) has one inferred from its first record: arrays become Tensors of unknown
dimensions (zlib-encoded beyond one), scalars Scalars, str / bytes Text, and lists or 1-D
arrays of str / bytes Sequence(Text).
"""
import numpy as np
import tensorflow_datasets as tfds

LATENT = "latent"
SOURCE_INDEX = "source_index"


def _copy(feature):
  return tfds.features.FeatureConnector.from_json(feature.to_json())


def _free_frames(feature):
  """The same feature with an unknown leading (frame) dimension."""
  if isinstance(feature, tfds.features.FeaturesDict):
    return tfds.features.FeaturesDict({k: _free_frames(v) for k, v in feature.items()})
  is_tensor = (isinstance(feature, tfds.features.Tensor)
               and not isinstance(feature, tfds.features.Scalar))
  if not is_tensor or not feature.shape or feature.shape[0] is None:
    return feature
  # pylint: disable=protected-access  (Tensor keeps its encoding and range privately)
  shape = (None,) + tuple(feature.shape[1:])
  encoding = "zlib" if sum(d is None for d in shape) > 1 else feature._encoding
  return tfds.features.Tensor(shape=shape, dtype=feature.np_dtype, encoding=encoding,
                              minimum=feature._minimum, maximum=feature._maximum)


def _is_text(value) -> bool:
  return isinstance(value, (str, bytes)) or (
      isinstance(value, np.ndarray) and value.dtype.kind in "SUO" and value.ndim == 0)


def infer_feature(value):
  """A TFDS feature that can hold `value` and others like it (of any frame count or size)."""
  if isinstance(value, dict):
    return tfds.features.FeaturesDict({k: infer_feature(v) for k, v in value.items()})
  if _is_text(value):
    return tfds.features.Text()
  if isinstance(value, (list, tuple)) and all(_is_text(v) for v in value) or (
      isinstance(value, np.ndarray) and value.dtype.kind in "SUO" and value.ndim == 1):
    return tfds.features.Sequence(tfds.features.Text())
  array = np.asarray(value)
  if array.dtype.kind in "SUO":
    raise ValueError(f"cannot store a {array.ndim}-D array of text ({array.dtype}); give the "
                     "source a TFDS feature spec")
  if array.ndim == 0:
    return tfds.features.Scalar(array.dtype)
  return tfds.features.Tensor(shape=(None,) * array.ndim, dtype=array.dtype,
                              encoding="zlib" if array.ndim > 1 else "none")


def source_features(source, first_record: dict) -> dict:
  """{name: feature} of the source's fields: its TFDS spec, else one inferred."""
  info = getattr(source, "dataset_info", None)
  if info is not None and getattr(info, "features", None) is not None:
    return {name: _copy(feature) for name, feature in info.features.items()}
  return {name: infer_feature(value) for name, value in first_record.items()}


def latent_features(source, first_record: dict, latent_channels: int,
                    frame_fields) -> tfds.features.FeaturesDict:
  """The record: the source's fields without `video`, plus `latent` float32 (T', H', W', C)
  and `source_index` int64 (the record's index in the source)."""
  fields = source_features(source, first_record)
  if "video" not in fields:
    raise ValueError(f"the source's records have no 'video' field (fields: {sorted(fields)})")
  for name in (LATENT, SOURCE_INDEX):
    if name in fields:
      raise ValueError(f"the source already has a field {name!r}, which the latent dataset "
                       "adds; rename it")
  del fields["video"]
  for name in frame_fields:
    if name in fields:
      fields[name] = _free_frames(fields[name])
  # Float latents hardly compress: stored as raw bytes (3 unknown dimensions need an encoding).
  fields[LATENT] = tfds.features.Tensor(shape=(None, None, None, latent_channels),
                                        dtype=np.float32, encoding="bytes")
  fields[SOURCE_INDEX] = tfds.features.Scalar(np.int64)
  return tfds.features.FeaturesDict(fields)
