"""worldsim: train and sample video world simulators in JAX/Flax.

  import worldsim
  video = worldsim.sample("a ball bounces", checkpoint="runs/physics_tiny", seconds=2,
                          aspect_ratio="16:9", size=32, sampler="dpmpp_2m", steps=16)
  worldsim.show(video)                       # in a notebook
  worldsim.save_video("clip.mp4", video, fps=8)

  env = worldsim.Env(worldsim.load("runs/physics_actions"), num_envs=16)   # a learned sandbox
  obs = env.reset(seed=0)
  frames, reward, terminated, info = env.step(actions)
"""
__version__ = "0.1.0"

from worldsim.env import Env
from worldsim.sampling import WorldSim, load, refine, sample
from worldsim.video import save_video, show

__all__ = ["Env", "GymEnv", "WorldSim", "load", "refine", "sample", "save_video", "show",
           "__version__"]


def __getattr__(name):
  # The gymnasium wrapper imports gymnasium (an extra), so only when it is asked for.
  if name == "GymEnv":
    from worldsim.gym_env import GymEnv
    return GymEnv
  raise AttributeError(f"module 'worldsim' has no attribute {name!r}")
