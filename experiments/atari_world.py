"""An Atari world model: the DiT conditioned on each frame's joystick action, with heads that
predict each frame's reward and whether the episode ends there (as DIAMOND reports them).

  python -c "from data_pipelines import atari; atari.build('runs/atari_world/data')"
  python -m worldsim.main --config=experiments/atari_world.py --workdir=runs/atari_world

The first line records the episodes (random sticky-action policies in Pong and Breakout,
64x64 frames; data_pipelines/atari) into <workdir>/data, where config.data.data_dir = ""
looks; the loader reads the one build it finds there. Then the stages of physics_tiny's
recipe: the VAE on crops of those frames, the latents, the DiT, samples. The argument after
':' picks a variant as in experiments/physics_tiny.py (`tiny`, a laptop CPU, by default).

Actions are ALE's full action set (18 ids, the same in every game), one per pixel frame,
one-hot per frame (models/conditioning.py); a latent frame reads its 4 frames' actions side by
side. The DiT is block-causal, as a world model stepped frame by frame needs; a share
diffusion.action_dropout of the clips trains with the actions unknown, for guidance. The
reward heads (DiT.heads) read the last block's state of every token: [reward, terminal logit]
of the frames it covers, trained with a squared error and a cross-entropy weighted by 1 - t
(a token at t near 1 is nearly pure noise), times train.heads_weight, beside the velocity
loss; metrics.jsonl logs flow_loss, reward_loss and terminal_loss.
"""
import ml_collections

from experiments import physics_tiny

NUM_ACTIONS = 18   # data_pipelines.atari.NUM_ACTIONS (not imported: that would load ALE)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  c = physics_tiny.get_config(arg)
  with c.unlocked():
    c.data.source = "atari"
    # Recorded frames are 64x64 (atari.build's frame_shape); min/max_side only check patches.
    c.data.min_side, c.data.max_side = 32, 64
    c.data.min_frames, c.data.max_frames = 5, 16     # random crops of the recorded clips

    c.model.actions = "discrete"
    c.model.action_size = NUM_ACTIONS
    c.model.reward_heads = True
    c.model.causal = True               # frame by frame: a frame sees its past and its actions
    c.train.heads_weight = 1.0

    c.sample.caption = "Pong, sticky-action random policy (p=0.25)"   # the builder's captions
    c.sample.height = c.sample.width = 64
  return c.lock()
