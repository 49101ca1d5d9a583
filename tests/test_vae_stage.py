"""The 'vae' stage end to end on procedural clips: training, metrics, latent statistics,
skipping when complete, the discriminator phase, resuming; and its config checks."""
import json
import shutil

import chex
import numpy as np
import pytest

from experiments import vae_tiny
from worldsim import config as config_lib
from worldsim.train import metrics, step as step_lib, trainer

DISC_START = 15


def _config():
  """vae_tiny shrunk to compile and step fast on 2 CPU cores: a 2-level VAE (2x in time and
  space, 4 base channels) on 5 x 16 x 16 crops of procedural clips."""
  config = vae_tiny.get_config("tiny")
  with config.unlocked():
    config.data.source = "shapes"
    config.data.min_side, config.data.max_side = 16, 32
    config.data.min_frames, config.data.max_frames = 3, 8   # 3-4 frames: shorter than the crop
    v = config.vae
    v.channel_multipliers, v.spatial_factor, v.temporal_factor = (1, 2), 2, 2
    v.base_channels, v.disc_channels, v.disc_layers = 4, 8, 2
    v.crop_frames, v.crop_height, v.crop_width = 5, 16, 16
    v.batch_size = 8
    v.steps, v.disc_start = 30, DISC_START
    v.save_every, v.log_every, v.keep_checkpoints = 8, 1, 5     # checkpoints 8, 16, 24, 30
    v.optim.learning_rate, v.optim.warmup_steps = 3e-3, 2
    v.stats_batches = 2
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir trained for 30 steps, the discriminator on from step 15. The train step may
  be traced (compiled) once only: chex.assert_max_traces raises on a second trace."""
  workdir = tmp_path_factory.mktemp("vae_stage") / "run"
  chex.clear_trace_counter()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(step_lib, "vae_train_step",
                  chex.assert_max_traces(step_lib.vae_train_step, n=1))
    trainer.train_vae(_config(), workdir)
  return workdir


def test_vae_stage_trains_and_writes_latent_stats(trained):
  rows = metrics.read(trained / "vae")
  assert [r["step"] for r in rows] == list(range(1, 31))
  assert {"loss", "recon", "kl", "psnr", "grad_norm", "learning_rate", "d_loss",
          "g_loss"} <= set(rows[-1])
  first = np.mean([r["recon"] for r in rows[:3]])
  last = np.mean([r["recon"] for r in rows[-3:]])
  assert last < 0.8 * first, (first, last)
  assert np.mean([r["psnr"] for r in rows[-3:]]) > np.mean([r["psnr"] for r in rows[:3]])
  assert rows[-2]["skipped_clips"] > 0          # clips shorter than the crop: skipped, counted
  assert (trained / "vae" / "checkpoints" / "30").is_dir()
  stats = json.loads((trained / "vae" / "latent_stats.json").read_text())
  assert stats["vae"]["latent_channels"] == 8 and stats["step"] == 30   # the recipe's 8
  assert len(stats["shift"]) == len(stats["scale"]) == 8
  assert all(s > 0 for s in stats["scale"]) and np.all(np.isfinite(stats["shift"]))


def test_a_complete_vae_stage_is_skipped(trained):
  stats = (trained / "vae" / "latent_stats.json").read_text()
  trainer.train_vae(_config(), trained)
  assert len(metrics.read(trained / "vae")) == 30
  assert (trained / "vae" / "latent_stats.json").read_text() == stats


def test_discriminator_switches_on_at_disc_start(trained):
  # The fixture's step compiled once: the phase is a condition on the step inside it.
  rows = {r["step"]: r for r in metrics.read(trained / "vae")}
  # Row s holds the metrics of the update from state step s - 1.
  for step in range(1, DISC_START + 1):
    assert rows[step]["d_loss"] == 0.0 and rows[step]["g_loss"] == 0.0
  for step in range(DISC_START + 1, 31):
    assert rows[step]["d_loss"] > 0.0 and rows[step]["g_loss"] != 0.0
  # Before the switch the loss is the reconstruction and KL terms alone.
  v = _config().vae
  np.testing.assert_allclose(rows[5]["loss"], rows[5]["recon"] + v.kl_weight * rows[5]["kl"],
                             rtol=1e-5)


def test_resuming_continues_with_the_same_losses(trained, tmp_path):
  resumed = tmp_path / "resumed"
  # "Interrupt" a copy after the save of step 24: drop the last checkpoint, the later
  # metrics and the statistics, then run again.
  shutil.copytree(trained, resumed)
  shutil.rmtree(resumed / "vae" / "checkpoints" / "30")
  (resumed / "vae" / "latent_stats.json").unlink()
  rows = [r for r in metrics.read(resumed / "vae") if r["step"] <= 24]
  (resumed / "vae" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  trainer.train_vae(_config(), resumed)
  straight = {r["step"]: r for r in metrics.read(trained / "vae")}
  again = {r["step"]: r for r in metrics.read(resumed / "vae")}
  assert sorted(again) == list(range(1, 31))
  for step in range(25, 31):                        # the discriminator's state came back too
    for name in ("loss", "recon", "d_loss", "g_loss"):
      np.testing.assert_allclose(again[step][name], straight[step][name], rtol=1e-6)
  stats = lambda w: json.loads((w / "vae" / "latent_stats.json").read_text())
  np.testing.assert_allclose(stats(resumed)["scale"], stats(trained)["scale"], rtol=1e-5)


@pytest.mark.parametrize("field,value,message", [
    ("crop_frames", 8, r"config\.vae\.crop_frames=8 is not 1 \+ 4k .* to 5 or 9"),
    ("crop_height", 30, r"config\.vae\.crop_height=30 is not a multiple of the VAE's spatial "
                        r"factor 4; set --config\.vae\.crop_height to 28 or 32"),
    ("crop_frames", 33, r"config\.vae\.crop_frames=33 is longer than every clip"),
    ("batch_size", 6, r"config\.vae\.batch_size=6 must be divisible by data x fsdp = 8"),
    ("variant", "huge", r"config\.vae: VAE variant 'huge' is unknown"),
    ("disc_start", 1750, r"config\.vae\.disc_start=1750 is not before config\.vae\.steps=1750"),
])
def test_bad_vae_config_fails_before_building(tmp_path, monkeypatch, field, value, message):
  config = _on_eight_devices(vae_tiny.get_config())
  with config.unlocked():
    config.vae[field] = value
  monkeypatch.setattr(trainer, "build_vae", lambda *a: pytest.fail("built a bad config"))
  with pytest.raises(config_lib.ConfigError, match=message):
    trainer.train_vae(config, tmp_path)


def _on_eight_devices(config):
  """The tiny recipe's batch of 4 crops cannot split over the tests' 8 host devices: 8."""
  with config.unlocked():
    config.vae.batch_size = 8
  return config


def test_crops_of_fewer_than_three_latent_frames_are_warned_about(caplog):
  config = _on_eight_devices(vae_tiny.get_config())
  config_lib.validate(config)                          # the recipe's 9 frames: 3 latent frames
  assert "crop_frames" not in caplog.text
  with config.unlocked():
    config.vae.crop_frames = 5
  config_lib.validate(config)
  assert "config.vae.crop_frames=5 gives 2 latent frames" in caplog.text
  assert "use 9 or more" in caplog.text


def test_vae_configs_pass_and_main_knows_the_stage():
  config_lib.validate(_on_eight_devices(vae_tiny.get_config()))
  config_lib.validate(vae_tiny.get_config("small"))
  from worldsim import main
  assert "vae" in main.STAGES and set(main.STAGES) == set(config_lib.STAGES)
