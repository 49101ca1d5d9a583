"""worldsim.eval: how physical a generated physics-world video is, against the engine.

  from worldsim.eval import physics_report, write_report, engine_ceiling
  report = physics_report(video, truth_record, second_take=another_take)
  write_report(report, outdir)   # report.json, tracks.png, horizon.png

tracks.py        objects found by colour: sub-pixel centroids per frame
physics.py       position error, gravity, bounce/collision timing, interpenetration,
                 permanence, particles leaving a container
masks.py         Physics-IQ-style motion masks: spatial, spatiotemporal, weighted IoU, MSE
video_metrics.py PSNR and SSIM over the horizon; controllability (true vs shuffled actions)
report.py        the report, its JSON and plots (plots.py), the engine-vs-engine ceiling
headline.py      headline(config, workdir): a trained model's mean report on held-out scenes
atari.py         Atari: a model's frames (and rewards) against ALE's from the same state,
                 fed the emulator's actions; PSNR/SSIM per horizon step (import it by name:
                 it needs the atari extra)

Needs the physics extra (pymunk): the object colours come from the physics world's palette.
"""
from worldsim.eval.headline import headline
from worldsim.eval.report import engine_ceiling, physics_report, write_report
from worldsim.eval.video_metrics import controllability

__all__ = ['controllability', 'engine_ceiling', 'headline', 'physics_report', 'write_report']
