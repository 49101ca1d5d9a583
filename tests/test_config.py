import pytest

from worldsim import config as config_lib
from worldsim.train import trainer


@pytest.mark.parametrize("field,value,message", [
    ("data.min_side", 2, "config.data.min_side=2 is smaller than one patch \\(4 pixels\\)"),
    ("data.resize", "stretch", "config.data.resize='stretch'"),
    ("data.max_tokens_per_clip", 4096, "max_tokens_per_clip \\(4096\\) <= config.data.token_budget"),
    ("model.variant", "huge", "config.model.variant='huge' is unknown"),
    ("model.num_heads", 5, "not divisible by config.model.num_heads=5"),
    ("data.batch_size", 6, "config.data.batch_size=6 must be divisible by data x fsdp = 8"),
    ("mesh.fsdp", 3, "does not divide the 8 devices"),
    ("model.attention", "flash", "config.model.attention='flash' is unknown"),
])
def test_bad_config_fails_before_compiling_with_the_field_and_fix(
    tiny_config, tmp_path, monkeypatch, field, value, message):
  section, name = field.split(".")
  with tiny_config.unlocked():
    setattr(getattr(tiny_config, section), name, value)
  # Nothing may be built (let alone compiled) for a config that cannot work.
  monkeypatch.setattr(trainer, "build", lambda *a: pytest.fail("built a model for a bad config"))
  with pytest.raises(config_lib.ConfigError, match=message):
    trainer.train(tiny_config, tmp_path)


def test_good_config_passes(tiny_config):
  config_lib.validate(tiny_config)


@pytest.mark.parametrize("field,value,message", [
    ("sample.num_frames", 12, "config.sample.num_frames=12 is not 1 \\+ 4k .* use 9 or 13"),
    ("sample.height", 36, "must give latents \\(4, 9, 8\\) .* patches of \\(1, 2, 2\\)"),
    ("data.min_side", 4, "smaller than one patch \\(8 pixels\\)"),
    ("latents.chunk_frames", 6, "config.latents.chunk_frames=6 must be a positive multiple"),
    ("data.space", "pixels", "config.data.space='pixels' is unknown"),
])
def test_the_latent_recipe_checks_sizes_against_the_vae(field, value, message):
  from experiments import physics_tiny
  config = physics_tiny.get_config("tiny")
  section, name = field.split(".")
  with config.unlocked():
    setattr(getattr(config, section), name, value)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config, num_devices=1)


def test_latents_stage_needs_latent_space_and_latent_space_needs_a_vae():
  from experiments import physics_tiny
  config = physics_tiny.get_config("tiny")
  with config.unlocked():
    config.data.space = "pixel"
  with pytest.raises(config_lib.ConfigError, match="set --config.data.space=latent"):
    config_lib.validate(config, num_devices=1)
  with config.unlocked():
    config.data.space = "latent"
    config.stages = ("dit",)
    del config["vae"]
  with pytest.raises(config_lib.ConfigError, match="needs a `vae` block"):
    config_lib.validate(config, num_devices=1)


def test_the_default_recipe_and_its_variants_pass():
  from experiments import physics_tiny, vae_tiny
  for config in (physics_tiny.get_config("tiny"), physics_tiny.get_config("S"),
                 vae_tiny.get_config("tiny")):
    config_lib.validate(config, num_devices=1)
