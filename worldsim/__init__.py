"""worldsim: train and sample video world simulators in JAX/Flax.

  import worldsim
  video = worldsim.sample(checkpoint="runs/physics_tiny", num_frames=8, height=16, width=16)
  worldsim.show(video)                       # in a notebook
  worldsim.save_video(video, "clip.mp4")
"""
__version__ = "0.1.0"

from worldsim.sampling import load, sample
from worldsim.video import save_video, show

__all__ = ["load", "sample", "save_video", "show", "__version__"]
