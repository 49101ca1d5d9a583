"""Model FLOP utilisation of the DiT train step, against a matmul measured in this process.

  python -m benchmarks.mfu                      # the S variant, 2048 tokens per step
  python -m benchmarks.mfu --variant=B --frames=8 --side=64 --batch=1
  python -m benchmarks.mfu --packed --attention=chunked   # real packed mixed-size rows
  python -m benchmarks.mfu --packed --text=bytes          # ... with captions

Prints the analytic FLOPs of one train step (attention included), XLA's own count for the
compiled step (the model is unrolled, so XLA sees every layer) and their ratio; the median
step time; the float32 (n x n) matmul FLOP/s of this device; and MFU = achieved / matmul.
The last line is one JSON object.

--packed feeds the loader's own batches instead: clips of mixed size (16-64 px sides, 2-16
frames, shapes source, pixel space) packed into rows of frames * (side / 4)^2 tokens. Model
FLOPs then count attention only within each clip (and its caption), as the masks allow
(flops.packed_train_flops), so MFU measures useful work; XLA's count is of the dense step.
"""
import argparse
import json
import time

import flax.linen as nn
import jax
import numpy as np

from data_pipelines import loader
from experiments import physics_tiny
from worldsim.parallel import mesh as mesh_lib
from worldsim.scaling import flops
from worldsim.train import trainer


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--variant", default="S")
  p.add_argument("--frames", type=int, default=8)
  p.add_argument("--side", type=int, default=32)     # 8 x 32 x 32 with (1, 4, 4) patches: 512 tokens
  p.add_argument("--batch", type=int, default=4)     # rows: 4 x 512 = 2048 tokens per step
  p.add_argument("--attention", default="xla")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--matmul_n", type=int, default=2048)
  p.add_argument("--packed", action="store_true", help="the loader's packed mixed-size rows")
  p.add_argument("--text", default="none", help="none or bytes (captions, 32 tokens each)")
  args = p.parse_args()

  config = physics_tiny.get_config(args.variant)
  with config.unlocked():
    config.stages, config.data.space = ("dit",), "pixel"
    config.model.patch_size = (1, 4, 4)
    config.model.attention = args.attention
    config.model.text = args.text
    config.data.token_budget = args.frames * (args.side // 4) ** 2    # one clip per row
    config.data.batch_size = args.batch
    config.data.caption_len = 32
    config.mesh.data = 1
    if args.packed:
      config.data.update(source="shapes", num_clips=256, min_side=16, max_side=64,
                         min_frames=2, max_frames=16, resize="native", max_clips_per_row=16,
                         packing_bins=16)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  setup = trainer.build(config, mesh)
  if args.packed:
    host = next(iter(loader.make_dataset(config.data, config.model.patch_size, 0,
                                         text=args.text)))
    batch = mesh_lib.global_batch(host, setup.batch_shardings)
    analytic = flops.packed_train_flops(setup.dit_cfg, host["segment_ids"],
                                        host.get("text_segment_ids"))
    clips = int((host["clip_index"] >= 0).sum())
    padding = float((host["segment_ids"] == 0).mean())
  else:
    batch = {k: jax.device_put(v, setup.batch_shardings[k])
             for k, v in trainer.example_batch(config).items()}
    text_len = batch["text"].shape[1] if "text" in batch else 0
    analytic = flops.dit_train_flops(setup.dit_cfg, setup.seq_len, args.batch, text_len=text_len)
    clips, padding = args.batch, 0.0

  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    state = setup.init(jax.random.PRNGKey(0))
    compiled = setup.train_step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    xla_flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - start)
  peak = flops.measure_matmul_flops(args.matmul_n)
  step_time = float(np.median(times))
  mfu = analytic / step_time / peak
  result = {
      "benchmark": "mfu", "device": jax.devices()[0].device_kind, "variant": args.variant,
      "attention": args.attention, "packed": args.packed, "text": args.text,
      "tokens_per_step": setup.seq_len * args.batch, "clips_per_step": clips,
      "padding_share": padding,
      "analytic_flops_per_step": analytic, "xla_flops_per_step": xla_flops,
      "analytic_over_xla": analytic / xla_flops, "step_time_s": step_time,
      "step_times_s": times, "matmul_flops_per_s": peak,
      "achieved_flops_per_s": analytic / step_time, "mfu": mfu, "goal_mfu": 0.45,
      "goal_met": mfu >= 0.45}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
