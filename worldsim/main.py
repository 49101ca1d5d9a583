"""Runs an experiment config's stages in order on a workdir.

  python -m worldsim.main --config=experiments/physics_tiny.py --workdir=runs/physics_tiny

Exit codes: 0 done; 143 (trainer.PREEMPTED_EXIT_CODE) preempted by SIGTERM after saving the
current step, so run the same command again to resume; 1 an error (its message says why).
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import jax

from worldsim import config as config_lib
from worldsim import sampling
from worldsim.train import latents, trainer

config_flags.DEFINE_config_file("config", None, "experiment config file (get_config(arg))",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, metrics and samples go")
flags.DEFINE_bool("distributed", False,
                  "call jax.distributed.initialize() first (multi-host TPU/GPU launches)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

# In order: the VAE, the latent dataset it encodes, the DiT on those latents, sample videos.
# Each stage resumes from its own checkpoint, or is skipped when its output is complete.
STAGES = {"vae": trainer.train_vae, "latents": latents.encode, "dit": trainer.train,
          "samples": sampling.write_samples}


def main(argv):
  del argv
  # orbax logs every save and restore at INFO; keep the run's own log readable.
  logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
  if FLAGS.distributed:
    jax.distributed.initialize()
  config = FLAGS.config
  config_lib.validate(config)
  try:
    for stage in config.stages:
      STAGES[stage](config, FLAGS.workdir)
  except trainer.Preempted as e:
    # Saved and committed: a distinct exit code, so a scheduler restarts the job (which
    # resumes by itself) instead of marking it done.
    logging.warning("%s; exiting with code %d", e, trainer.PREEMPTED_EXIT_CODE)
    sys.exit(trainer.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  app.run(main)
