"""worldsim: train and sample video world simulators in JAX/Flax.

  import worldsim
  video = worldsim.sample("a ball bounces", checkpoint="runs/physics_tiny", seconds=2,
                          aspect_ratio="16:9", size=32, sampler="dpmpp_2m", steps=16)
  worldsim.show(video)                       # in a notebook
  worldsim.save_video("clip.mp4", video, fps=8)
"""
__version__ = "0.1.0"

from worldsim.sampling import WorldSim, load, refine, sample
from worldsim.video import save_video, show

__all__ = ["WorldSim", "load", "refine", "sample", "save_video", "show", "__version__"]
