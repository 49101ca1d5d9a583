import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from worldsim.train import step


def _cfg(per_frame_noise):
  return ml_collections.ConfigDict(dict(logit_normal_mean=0.0, logit_normal_std=1.0,
                                        shift_base_tokens=10 ** 6, max_shift=1.0,
                                        per_frame_noise=per_frame_noise))


def _row():
  # Two clips: 3 frames x 4 tokens, then 2 frames x 3 tokens; then 2 padding tokens.
  seg = np.array([[1] * 12 + [2] * 6 + [0] * 2])
  frames = np.array([[0] * 4 + [1] * 4 + [2] * 4 + [0] * 3 + [1] * 3 + [0] * 2])
  return jnp.asarray(seg), jnp.asarray(frames)


def test_per_clip_noise_is_constant_within_each_clip():
  seg, frames = _row()
  t = np.asarray(step.sample_noise_levels(jax.random.PRNGKey(0), seg, frames, _cfg(0.0)))[0]
  assert len(set(t[:12])) == 1 and len(set(t[12:18])) == 1 and t[0] != t[12]


def test_per_frame_noise_is_constant_within_each_frame_and_differs_across_frames():
  seg, frames = _row()
  t = np.asarray(step.sample_noise_levels(jax.random.PRNGKey(0), seg, frames, _cfg(1.0)))[0]
  runs = [t[0:4], t[4:8], t[8:12], t[12:15], t[15:18]]
  assert all(len(set(r)) == 1 for r in runs)
  assert len({r[0] for r in runs}) == 5
  assert ((t > 0) & (t < 1)).all()


def test_share_of_per_frame_clips_follows_the_config():
  seg, frames = _row()
  keys = jax.random.split(jax.random.PRNGKey(1), 400)
  t = np.asarray(jax.vmap(lambda k: step.sample_noise_levels(k, seg, frames, _cfg(0.3))[0])(keys))
  per_frame = np.mean([len(set(row[:12])) > 1 for row in t])
  assert 0.2 < per_frame < 0.4
