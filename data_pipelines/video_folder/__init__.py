"""A folder of the user's videos as a TFDS (ArrayRecord) dataset of captioned clips."""
from data_pipelines.video_folder.builder import build, load, make_config, VideoFolder
