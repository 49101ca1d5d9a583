"""Pure update functions: the train states, the DiT rectified-flow step and the VAE step."""
import functools
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from worldsim.diffusion import flow
from worldsim.models import conditioning
from worldsim.models import dit as dit_lib
from worldsim.models import text as text_lib
from worldsim.models import vae as vae_lib

# Constants folded into a step's rng for the draws added after the noise levels and noise, so
# those stay what a run without the addition draws from the same seed.
_CAPTION_DROPOUT_RNG = 1
_ACTION_DROPOUT_RNG = 2


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array        # raw uint32 key data: checkpoints store it as a plain array


def captions(batch: dict) -> dict:
  """The DiT's caption arguments in a batch: text (B, Lt) int32 byte tokens or (B, Lt, E)
  float embeddings, and text_segment_ids (B, Lt); empty for an uncaptioned batch."""
  return {k: batch[k] for k in ("text", "text_segment_ids") if k in batch}


class ActionSpec(NamedTuple):
  """How the loader's per-clip, per-model-frame arrays (actions, rewards, terminals: (B, M, F,
  n)) become per-token ones: the action mode and size (models/conditioning.py) and the model
  frames one patch spans (its pt)."""
  mode: str = "none"
  size: int = 0
  frames_per_patch: int = 1

  @property
  def raw_width(self) -> int:
    """Raw action values per pixel frame, as users give them and the loader ships them:
    `size` floats (continuous), one id (discrete), none (0)."""
    return 0 if self.mode == "none" else self.size if self.mode == "continuous" else 1


def action_spec(model_cfg) -> ActionSpec:
  """The ActionSpec of an experiment config's `model` block (read with defaults, so configs
  from before actions existed stay valid); training, sample(), the rollouts and Env read it."""
  return ActionSpec(model_cfg.get("actions", "none"), int(model_cfg.get("action_size", 0)),
                    int(model_cfg.patch_size[0]))


def model_inputs(model: nn.Module, batch: dict) -> dict:
  """The DiT's keyword inputs in a (noised) batch: the captions, and for an action-conditioned
  model the per-token actions and their known flags (`draw_noise`)."""
  inputs = captions(batch)
  if model.cfg.action_dim:
    inputs.update(actions=batch["token_actions"], actions_known=batch["actions_known"])
  return inputs


def init_state(model: nn.Module, tx: optax.GradientTransformation, batch: dict, rng) -> TrainState:
  """`batch` is a packed batch's shapes (trainer.example_batch); an action-conditioned model
  reads zero actions of its width."""
  init_rng, state_rng = jax.random.split(rng)
  segment_ids = batch["segment_ids"]
  if model.cfg.action_dim:
    batch = dict(batch, token_actions=jnp.zeros((*segment_ids.shape, model.cfg.action_dim)),
                 actions_known=jnp.ones(segment_ids.shape, jnp.float32))
  variables = model.init(init_rng, batch["tokens"], batch["positions"], segment_ids,
                         jnp.zeros(segment_ids.shape, jnp.float32), **model_inputs(model, batch))
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=params, rng=state_rng)


def per_token(values, segment_ids):
  """Broadcasts per-segment values (B, S) to tokens (B, L) by segment id."""
  return jnp.take_along_axis(values, segment_ids, axis=1)


def tokens_per_segment(segment_ids):
  """(B, L) -> (B, L): the token count of each token's own segment."""
  counts = jax.vmap(lambda s: jnp.bincount(s, length=s.shape[0]))(segment_ids)
  return per_token(counts, segment_ids)


def frame_runs(segment_ids, frames):
  """(B, L) -> (B, L): a run index that changes wherever the (segment, latent frame) changes.

  Tokens are frame-major within a clip, so the tokens of one frame of one clip are a
  contiguous run; run r's values live in column r of a (B, L) table.
  """
  changed = (segment_ids[:, 1:] != segment_ids[:, :-1]) | (frames[:, 1:] != frames[:, :-1])
  return jnp.concatenate([jnp.zeros_like(segment_ids[:, :1]),
                          jnp.cumsum(changed, axis=1, dtype=segment_ids.dtype)], axis=1)


def sample_noise_levels(rng, segment_ids, frames, diffusion_cfg):
  """Per-token t: one t per clip, or (diffusion forcing) one t per latent frame of the clip.

  A share `per_frame_noise` of the clips draws a t for each latent frame, so one model learns
  to denoise a whole clip jointly, to continue clean frames and to roll out chunk by chunk.
  """
  d = diffusion_cfg
  clip_rng, frame_rng, choice_rng = jax.random.split(rng, 3)
  t_clip = per_token(flow.sample_time(clip_rng, segment_ids.shape, d.logit_normal_mean,
                                      d.logit_normal_std), segment_ids)
  t_frame = per_token(flow.sample_time(frame_rng, segment_ids.shape, d.logit_normal_mean,
                                       d.logit_normal_std), frame_runs(segment_ids, frames))
  use_frames = per_token(jax.random.uniform(choice_rng, segment_ids.shape) < d.per_frame_noise,
                         segment_ids)
  t = jnp.where(use_frames, t_frame, t_clip)
  shift = flow.shift_for_tokens(tokens_per_segment(segment_ids), d.shift_base_tokens, d.max_shift)
  return flow.shift_time(t, shift)


def drop_captions(rng, text, text_segment_ids, rate: float):
  """Replaces each clip's caption, with probability `rate`, by the null caption, so that one
  model learns both the conditional and the unconditional velocity classifier-free guidance
  mixes.

  text (B, Lt) byte tokens or (B, Lt, E) embeddings, text_segment_ids (B, Lt) -> both, same
  shapes. A dropped clip keeps only its first token, the segment id of the rest set to 0:
    bytes       the first token is BOS, so the clip's text equals text.null_text's BOS alone
    embeddings  the kept row is zeroed too: an external encoder's first row depends on the
                caption, a zero row does not (text.null_text builds the same)
  """
  draws = jax.random.uniform(rng, text_segment_ids.shape) < rate      # column s: segment s
  dropped = per_token(draws, text_segment_ids) & (text_segment_ids > 0)
  masked = dropped & ~text_lib.first_of_segment(text_segment_ids)
  if text.ndim == 2:
    text = jnp.where(masked, text_lib.PAD, text)
  else:
    text = jnp.where(dropped[..., None], jnp.zeros((), text.dtype), text)
  return text, jnp.where(masked, 0, text_segment_ids)


def token_action_inputs(batch: dict, rng, spec: ActionSpec, rate: float) -> dict:
  """Per-token action inputs from the batch's per-clip `actions` (B, M, F, A raw):
    token_actions  (B, L, pt x features): conditioning.action_features (discrete ids one-hot)
                   of the frames each token spans (conditioning.token_actions)
    actions_known  (B, L): 0 on a share `rate` of the clips (action dropout, so guidance has
                   a model that does not know the actions), else 1
  """
  if "actions" not in batch:
    raise KeyError(f"config.model.actions={spec.mode!r} but the batch has no 'actions': the "
                   f"source gives none (see config.validate)")
  segment_ids = batch["segment_ids"]
  features = conditioning.action_features(batch["actions"], spec.mode, spec.size)
  return {"token_actions": conditioning.token_actions(features, segment_ids, batch["positions"],
                                                      spec.frames_per_patch),
          "actions_known": conditioning.drop_actions(rng, segment_ids, batch["actions"].shape[1],
                                                     rate)}


def draw_noise(batch: dict, rng, diffusion_cfg, actions: ActionSpec = ActionSpec()) -> dict:
  """The batch with its training noise drawn: per-token noise levels `t` (B, L), Gaussian
  `eps` like the tokens, the captions after dropout and the per-token actions with their
  dropout. Drawn for the whole batch at once, so accumulating gradients over parts of it
  trains on exactly the same noise (every array added is (B, ...)).

  With captions in the batch (`captions`), a share diffusion_cfg.caption_dropout (default 0)
  of the clips trains with the null caption instead (`drop_captions`). With actions on
  (actions.mode), a share diffusion_cfg.action_dropout (default 0) trains with the actions
  unknown (`token_action_inputs`).
  """
  x0, segment_ids = batch["tokens"], batch["segment_ids"]
  t_rng, eps_rng = jax.random.split(rng)
  noised = dict(batch, t=sample_noise_levels(t_rng, segment_ids, batch["positions"][..., 0],
                                             diffusion_cfg),
                eps=jax.random.normal(eps_rng, x0.shape, x0.dtype))
  rate = diffusion_cfg.get("caption_dropout", 0.0)
  if captions(batch) and rate > 0:
    # Folded in rather than split off: the noise levels and noise stay those of an
    # uncaptioned run with the same seed.
    noised["text"], noised["text_segment_ids"] = drop_captions(
        jax.random.fold_in(rng, _CAPTION_DROPOUT_RNG), batch["text"], batch["text_segment_ids"],
        rate)
  if actions.mode != "none":
    noised.update(token_action_inputs(batch, jax.random.fold_in(rng, _ACTION_DROPOUT_RNG),
                                      actions, diffusion_cfg.get("action_dropout", 0.0)))
  return noised


def head_targets(batch: dict, frames_per_patch: int) -> dict:
  """Each token's reward and terminal targets (B, L) from the batch's per-clip `rewards` and
  `terminals` (B, M, F, k: k pixel frames per model frame): of the k x pt pixel frames its
  patch spans, the summed reward and whether any ends the episode. A token's target thus
  sits at the frames of the actions it is conditioned on (conditioning.token_actions)."""
  missing = [k for k in ("rewards", "terminals") if k not in batch]
  if missing:
    raise KeyError(f"config.model.reward_heads is on but the batch has no {missing}: the "
                   f"source gives no rewards (see config.validate)")
  gather = lambda x: conditioning.token_actions(x.astype(jnp.float32), batch["segment_ids"],
                                                batch["positions"], frames_per_patch)
  return {"token_rewards": jnp.sum(gather(batch["rewards"]), axis=-1),
          "token_terminals": jnp.max(gather(batch["terminals"]), axis=-1)}


def summed_losses(params, model, noised: dict) -> dict:
  """Sums over real (non-padding) tokens of
    flow      the squared velocity error (mean over channels)
  and, for a model with reward heads given targets (`head_targets`), of the heads' errors
  weighted by 1 - t (a token at t near 1 is nearly pure noise and cannot know its frame):
    reward    squared error of the predicted reward
    terminal  binary cross-entropy of the terminal logit
  """
  x0, eps, t, segment_ids = noised["tokens"], noised["eps"], noised["t"], noised["segment_ids"]
  real = segment_ids > 0
  args = ({"params": params}, flow.noise(x0, eps, t), noised["positions"], segment_ids, t)
  heads = model.cfg.reward_heads and "token_rewards" in noised
  if heads:
    v_pred, predicted = model.apply(*args, **model_inputs(model, noised),
                                    method=dit_lib.DiT.velocity_and_heads)
  else:
    v_pred = model.apply(*args, **model_inputs(model, noised))
  err = jnp.mean(jnp.square(v_pred - flow.velocity_target(x0, eps)), axis=-1)
  sums = {"flow": jnp.sum(err * real)}
  if heads:
    weight = (1.0 - t) * real
    reward_err = jnp.square(predicted[..., 0] - noised["token_rewards"])
    terminal_err = optax.sigmoid_binary_cross_entropy(predicted[..., 1],
                                                      noised["token_terminals"])
    sums.update(reward=jnp.sum(weight * reward_err), terminal=jnp.sum(weight * terminal_err))
  return sums


def summed_loss(params, model, noised: dict):
  """Sum over real (non-padding) tokens of the squared velocity error (mean over channels)."""
  return summed_losses(params, model, noised)["flow"]


def objective(sums: dict, heads_weight: float):
  """What the step minimises: flow + heads_weight x (reward + terminal), from summed_losses."""
  return sums["flow"] + heads_weight * (sums.get("reward", 0.0) + sums.get("terminal", 0.0))


def real_tokens(batch: dict):
  return jnp.maximum(jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32), 1.0)


def training_batch(batch: dict, rng, model, diffusion_cfg, actions: ActionSpec) -> dict:
  """The batch with everything the loss reads: the noise and action inputs (`draw_noise`)
  and, for a model with reward heads, the per-token targets (`head_targets`)."""
  noised = draw_noise(batch, rng, diffusion_cfg, actions)
  if model.cfg.reward_heads:
    noised.update(head_targets(batch, actions.frames_per_patch))
  return noised


def dit_loss(params, model, batch, rng, diffusion_cfg, actions: ActionSpec = ActionSpec(),
             heads_weight: float = 1.0):
  """Rectified-flow loss: mean squared velocity error over the real (non-padding) tokens
  (plus the reward heads' weighted losses, `objective`)."""
  sums = summed_losses(params, model, training_batch(batch, rng, model, diffusion_cfg, actions))
  return objective(sums, heads_weight) / real_tokens(batch)


def _micro_batches(noised: dict, k: int) -> dict:
  """(B, ...) -> (k, B / k, ...): micro-batch j holds rows j, j + k, ..., so a batch sharded
  over devices keeps every micro-batch spread over all of them."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1),
                      noised)


def loss_and_grads(params, model, batch, rng, diffusion_cfg, accum_steps: int = 1,
                   actions: ActionSpec = ActionSpec(), heads_weight: float = 1.0):
  """((dit_loss, its parts), gradient); with accum_steps > 1 the batch's rows are run in that
  many parts one after another (activations of one part at a time), the gradients summed.
  Same noise, same normalisation (by the whole batch's real tokens): the same loss and
  gradients as one pass, up to float rounding. The parts are summed_losses' means over the
  real tokens (flow alone without reward heads)."""
  noised = training_batch(batch, rng, model, diffusion_cfg, actions)
  total = real_tokens(batch)

  def part_loss(p, part):
    sums = jax.tree.map(lambda x: x / total, summed_losses(p, model, part))
    return objective(sums, heads_weight), sums

  if accum_steps == 1:
    return jax.value_and_grad(part_loss, has_aux=True)(params, noised)

  def accumulate(carry, part):
    out = jax.value_and_grad(part_loss, has_aux=True)(params, part)
    return jax.tree.map(jnp.add, carry, out), None

  zero = jnp.zeros((), jnp.float32)
  parts = ("flow", "reward", "terminal") if "token_rewards" in noised else ("flow",)
  zeros = ((zero, {k: zero for k in parts}), jax.tree.map(jnp.zeros_like, params))
  out, _ = jax.lax.scan(accumulate, zeros, _micro_batches(noised, accum_steps))
  return out


def ema_update(ema, params, decay, step):
  # Warm the decay up so early EMA weights are not dominated by the random initialisation.
  decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def skip_if_nonfinite(new_state, state, *losses_and_norms):
  """`new_state` if every value given (losses, gradient norms) is finite, else `state` with
  only its step advanced; and 1.0 where the update was skipped (the `update_skipped` metric).

  A NaN or Inf loss or gradient would poison the parameters, the optimizer's moments and the
  EMA for good, so the whole update is dropped: an exact elementwise select, which keeps the
  donated state's buffers. The step still advances, so the next step draws fresh noise
  (fold_in(rng, step)) from the next batch, and state.step keeps counting batches consumed
  (the loop's step and the checkpoint's name); the optimizer's own count, and with it the
  learning-rate schedule, counts updates applied. A gradient norm that overflows to inf
  counts as non-finite too.
  """
  finite = jnp.all(jnp.isfinite(jnp.stack([jnp.asarray(v, jnp.float32)
                                           for v in losses_and_norms])))
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  return kept.replace(step=new_state.step), 1.0 - finite.astype(jnp.float32)


def dit_train_step(state: TrainState, batch: dict, *, model, tx, schedule, diffusion_cfg,
                   ema_decay: float, accum_steps: int = 1, actions: ActionSpec = ActionSpec(),
                   heads_weight: float = 1.0):
  """One optimiser update (gradients accumulated over accum_steps parts of the batch), or
  none when the loss or a gradient is not finite (`skip_if_nonfinite`). Pure: jit it with
  the state donated. `loss` is what is minimised; a model with reward heads also reports
  flow_loss, reward_loss and terminal_loss (unweighted means over real tokens)."""
  rng = jax.random.fold_in(state.rng, state.step)
  (loss, parts), grads = loss_and_grads(state.params, model, batch, rng, diffusion_cfg,
                                        accum_steps, actions, heads_weight)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state,
      ema_params=ema_update(state.ema_params, params, ema_decay, state.step))
  grad_norm = optax.tree.norm(grads)
  new_state, skipped = skip_if_nonfinite(new_state, state, loss, grad_norm)
  metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
             "update_skipped": skipped}
  if len(parts) > 1:
    metrics.update({f"{name}_loss": value for name, value in parts.items()})
  return new_state, metrics


# ----------------------------------------------------------------------------- VAE

@flax.struct.dataclass
class VAEState:
  step: jax.Array
  params: Any
  opt_state: Any
  disc_params: Any      # the 3D patch discriminator's; None when it is off (disc_start < 0)
  disc_opt_state: Any
  rng: jax.Array        # raw uint32 key data, as in TrainState


def vae_init_state(model: nn.Module, tx: optax.GradientTransformation, disc, disc_tx, video,
                   rng) -> VAEState:
  """The VAE's (and, when `disc` is given, the discriminator's) parameters and optimizers.

  The initialisers draw their bits with XLA's RngBitGenerator ('rbg' keys made from `rng`):
  compiling threefry for the VAE's ~100 kernels takes ~30 s on 2 CPU cores, rbg ~4 s.
  """
  init_rng, state_rng = jax.random.split(rng)
  init_key = jax.random.wrap_key_data(jnp.tile(init_rng, 2), impl="rbg")   # rbg: 4 words
  vae_key, disc_key = jax.random.split(init_key)
  params = model.init(vae_key, video)["params"]
  disc_params = None if disc is None else disc.init(disc_key, video)["params"]
  return VAEState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                  disc_params=disc_params,
                  disc_opt_state=None if disc is None else disc_tx.init(disc_params),
                  rng=state_rng)


def psnr(reconstruction, target):
  """Mean per-clip PSNR (dB) of [-1, 1] pixels mapped to [0, 1], the reconstruction clipped."""
  x = (jnp.clip(reconstruction, -1.0, 1.0) + 1.0) / 2.0
  y = (target + 1.0) / 2.0
  mse = jnp.mean(jnp.square(x - y), axis=tuple(range(1, x.ndim)))
  return jnp.mean(-10.0 * jnp.log10(jnp.maximum(mse, 1e-10)))


def vae_loss(params, disc_params, video, rng, disc_on, *, model, disc, kl_weight, l2_weight,
             disc_weight):
  """Reconstruction (L1 + l2_weight L2) + kl_weight KL [+ disc_weight hinge G loss once on].

  Returns (loss, (parts, reconstruction)); the adversarial part is 0 (and not computed)
  while `disc_on` is False.
  """
  reconstruction, mean, logvar = model.apply({"params": params}, video, rng)
  recon = (vae_lib.l1_loss(reconstruction, video)
           + l2_weight * vae_lib.l2_loss(reconstruction, video))
  kl = vae_lib.kl_loss(mean, logvar)
  parts = {"recon": recon, "kl": kl}
  loss = recon + kl_weight * kl
  if disc is not None:
    parts["g_loss"] = lax.cond(
        disc_on, lambda x: vae_lib.hinge_g_loss(disc.apply({"params": disc_params}, x)),
        lambda x: jnp.zeros((), jnp.float32), reconstruction)
    loss = loss + disc_weight * parts["g_loss"]
  return loss, (parts, reconstruction)


def disc_update(disc_params, disc_opt_state, video, reconstruction, *, disc, disc_tx):
  """One hinge-loss step of the discriminator on real clips vs (fixed) reconstructions."""
  def loss_fn(p):
    real = disc.apply({"params": p}, video)
    fake = disc.apply({"params": p}, lax.stop_gradient(reconstruction))
    return vae_lib.hinge_d_loss(real, fake)
  d_loss, grads = jax.value_and_grad(loss_fn)(disc_params)
  updates, disc_opt_state = disc_tx.update(grads, disc_opt_state, disc_params)
  return optax.apply_updates(disc_params, updates), disc_opt_state, d_loss


def vae_train_step(state: VAEState, batch: dict, *, model, tx, schedule, disc=None,
                   disc_tx=None, disc_start: int = -1, kl_weight: float, l2_weight: float,
                   disc_weight: float):
  """One update of the VAE and, from step `disc_start` on, of its discriminator (`disc`,
  None when it is off), or of neither when a loss or the VAE's gradient is not finite
  (`skip_if_nonfinite`). Pure: jit it with the state donated.

  The phase is a traced condition on the step (lax.cond), so one compiled step serves the
  steps before and after `disc_start`; before it the discriminator is neither run nor
  updated, and d_loss and g_loss read 0.
  """
  video = batch["video"]
  rng = jax.random.fold_in(state.rng, state.step)
  disc_on = state.step >= disc_start      # only read when there is a discriminator
  loss_fn = functools.partial(vae_loss, model=model, disc=disc, kl_weight=kl_weight,
                              l2_weight=l2_weight, disc_weight=disc_weight)
  (loss, (parts, reconstruction)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.disc_params, video, rng, disc_on)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state)
  metrics = {"loss": loss, **parts, "psnr": psnr(reconstruction, video),
             "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)}
  if disc is not None:
    update = functools.partial(disc_update, video=video, reconstruction=reconstruction,
                               disc=disc, disc_tx=disc_tx)
    keep = lambda p, o: (p, o, jnp.zeros((), jnp.float32))
    disc_params, disc_opt_state, metrics["d_loss"] = lax.cond(
        disc_on, update, keep, state.disc_params, state.disc_opt_state)
    new_state = new_state.replace(disc_params=disc_params, disc_opt_state=disc_opt_state)
  new_state, metrics["update_skipped"] = skip_if_nonfinite(
      new_state, state, loss, metrics["grad_norm"], metrics.get("d_loss", 0.0))
  return new_state, metrics
