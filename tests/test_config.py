import pytest

from worldsim import config as config_lib
from worldsim.train import trainer


@pytest.mark.parametrize("field,value,message", [
    ("data.min_side", 2, "config.data.min_side=2 is smaller than the patch's height/width 4"),
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
