"""The physics world as an action-conditioned world model: physics_tiny's recipe, with each
frame's push of the scene's agent as the DiT's action input.

  python -m worldsim.main --config=experiments/physics_actions.py --workdir=runs/physics_actions
  python -m worldsim.main --config=experiments/physics_actions.py:S --workdir=runs/physics_actions_s

Same four stages and variants as experiments/physics_tiny.py. The physics_world clips carry
actions (T, 2): an impulse on the agent right after frame t, zero when nothing is pushed
(data_pipelines/physics_world/simulate.py). The builder pushes the agent in half of the clips
(config.data.active_fraction = 0.5; one scene family of seven, `spill`, has no agent) at least
once and then with probability config.data.push_probability = 0.1 per frame: a little under
half of the clips, and of the random crops the DiT trains on, hold a push (about 45% and 44%, counted over 300 clips of this
recipe); the rest teach it that known zero actions mean nothing is pushed. Clips are at least 9 frames (3 latent frames), so every crop has frames
after a push to show its effect.

The DiT is block-causal, as a world model stepped frame by frame needs: a frame sees its past
and its own actions (model frame f of a clip reads the pushes applied right after its pixel
frames, which show from the next frame on), and rollouts keep a KV cache. A share
diffusion.action_dropout of the clips trains with the actions unknown, for guidance.
"""
import ml_collections

from experiments import physics_tiny


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  c = physics_tiny.get_config(arg)
  with c.unlocked():
    c.model.actions = "continuous"      # physics_world: an impulse (x, y) per frame
    c.model.action_size = 2
    c.model.causal = True               # frame by frame: a frame sees its past and its actions
    # Long enough that a push has frames after it to show in (min 9: 3 latent frames).
    c.data.min_frames = max(c.data.min_frames, 9)
    c.sample.caption = "a ball rolls down a ramp; the ball is pushed once"
  return c.lock()
