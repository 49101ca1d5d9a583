"""TFDS builder over a folder of the user's videos: clips at native resolution, with captions.

Every video file under the folder (mp4, webm, mov, gif, mkv, avi, m4v; subfolders included)
is decoded with PyAV and cut into clips. A bad file is never fatal: one that cannot be
decoded (or is too short) is skipped, and one that ends early (truncated) keeps the clips
decoded before the end. The build ends with a report, `{"ingested": {file: clips},
"partial": {file: reason}, "skipped": {file: reason}}`, logged and written as
`ingest_report.json` beside the dataset's files.

Each option set is its own TFDS config (directory), so building again with other options
never returns a stale dataset. One data_dir holds the datasets of one video folder.
Records are written as ArrayRecord and read back without TensorFlow.
"""
import dataclasses
import json
from pathlib import Path

from absl import logging
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from data_pipelines.built import clip_features, load_built
from data_pipelines.video_folder import decode

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".gif", ".mkv", ".avi", ".m4v")
REPORT_NAME = "ingest_report.json"


@dataclasses.dataclass(eq=False)
class VideoFolderConfig(tfds.core.BuilderConfig):
  """Ingest options (see `decode.decode_clips`); `make_config` names the config after them."""
  max_side: int | None = None
  fps: float | None = None
  clip_frames: int = 64
  min_clip_frames: int = 8


def make_config(*, max_side: int | None = None, fps: float | None = None,
                clip_frames: int = 64, min_clip_frames: int = 8) -> VideoFolderConfig:
  if clip_frames < 1 or not 1 <= min_clip_frames <= clip_frames:
    raise ValueError(f"need 1 <= min_clip_frames ({min_clip_frames}) <= clip_frames "
                     f"({clip_frames})")
  name = (f"side{max_side or 'native'}_fps{f'{fps:g}' if fps else 'native'}"
          f"_clip{clip_frames}_min{min_clip_frames}")
  return VideoFolderConfig(name=name, max_side=max_side, fps=fps, clip_frames=clip_frames,
                           min_clip_frames=min_clip_frames)


def find_videos(video_dir: Path) -> list[Path]:
  return sorted(p for p in video_dir.rglob("*")
                if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())


def read_caption(video_path: Path) -> str:
  """The sidecar `<stem>.txt` beside the video, or '' when there is none."""
  sidecar = video_path.with_suffix(".txt")
  return sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.is_file() else ""


class VideoFolder(tfds.core.GeneratorBasedBuilder):
  """Clips of the videos in `video_dir`; construct with `config=make_config(...)`."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, video_dir=None, **kwargs):
    self._video_dir = Path(video_dir) if video_dir is not None else None
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=clip_features(**{
            # (T, 0): no actions. Declared (None, None) because TFDS cannot decode an empty
            # (None, 0) tensor without its stored shape.
            "actions": tfds.features.Tensor(shape=(None, None), dtype=np.float32,
                                            encoding="zlib"),
            "source": tfds.features.Text(),
            "clip_index": tfds.features.Scalar(dtype=np.int32),
        }))

  def _split_generators(self, dl_manager):
    if self._video_dir is None or not self._video_dir.is_dir():
      raise ValueError(f"VideoFolder needs video_dir=<a folder of videos>, got {self._video_dir}")
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    config = self.builder_config
    report = {"video_dir": str(self._video_dir), "ingested": {}, "partial": {},
              "skipped": {}}
    for path in tqdm.tqdm(find_videos(self._video_dir), desc="Decoding videos", unit="file"):
      source = path.relative_to(self._video_dir).as_posix()
      caption = read_caption(path)
      clip_index = 0
      try:
        for video, fps in decode.decode_clips(
            path, max_side=config.max_side, fps=config.fps, clip_frames=config.clip_frames,
            min_clip_frames=config.min_clip_frames):
          yield f"{source}#{clip_index}", {
              "video": video, "fps": fps, "caption": caption,
              "actions": np.zeros((len(video), 0), np.float32),
              "source": source, "clip_index": clip_index}
          clip_index += 1
      except Exception as e:  # pylint: disable=broad-except  # a bad file never stops the build
        reason = f"{type(e).__name__}: {e}"
        if clip_index:   # the clips decoded before the error are kept
          report["partial"][source] = f"{reason} (kept {clip_index} clips)"
        else:
          report["skipped"][source] = reason
        continue
      if clip_index:
        report["ingested"][source] = clip_index
      else:
        report["skipped"][source] = (f"shorter than min_clip_frames={config.min_clip_frames} "
                                     "frames after resampling")
    self._write_report(report)

  def _write_report(self, report: dict) -> None:
    # During download_and_prepare, data_dir is the temporary directory that becomes the
    # dataset's, so the report lands beside the record files.
    Path(self.data_dir, REPORT_NAME).write_text(json.dumps(report, indent=2))
    logging.info("Ingested %d clips from %d files of %s.", sum(report["ingested"].values()),
                 len(report["ingested"]), self._video_dir)
    for kind in ("partial", "skipped"):
      for source, reason in report[kind].items():
        logging.warning("%s %s: %s", kind.capitalize(), source, reason)


def build(data_dir, video_dir, **options) -> VideoFolder:
  """Ingests `video_dir` into `data_dir` (skipped when that option set is already built).

  `options` are `make_config`'s, e.g. build(d, videos, max_side=256, fps=12, clip_frames=32).
  """
  builder = VideoFolder(data_dir=data_dir, video_dir=video_dir, file_format="array_record",
                        config=make_config(**options))
  builder.download_and_prepare()
  return builder


def load(data_dir, split: str = "train", config: str | None = None):
  """A random-access source of the clips built in `data_dir` (see built.load_built)."""
  return load_built(data_dir, VideoFolder, split, config)
