"""Padding of the packing loader on a mixed-resolution, mixed-length stream, beside buckets.

  python -m benchmarks.packing                      # shapes: 4-16 frames, 16-64 px a side
  python -m benchmarks.packing --min_side=16 --max_side=32 --max_frames=8 \
      --token_budget=1024 --max_tokens_per_clip=256 --batch_size=4   # the tiny recipe's data
  python -m benchmarks.packing --source=physics_world --data_dir=/tmp/pw   # builds it first

Runs the real loader (grain's best-fit packing) and counts padding slots (segment id 0) among
all slots of the batches. The baseline pads each clip of the same stream to the smallest of
four bucket lengths that holds it (the largest clip's / 8, / 4, / 2, / 1), as
resolution-bucket loaders do. Goal: <= 2% padding and at least 5x less than buckets.
The last line is one JSON object.
"""
import argparse
import itertools
import json

import ml_collections
import numpy as np

from data_pipelines import loader


def data_config(args) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      source=args.source, data_dir=args.data_dir, num_clips=args.num_clips,
      batch_size=args.batch_size, token_budget=args.token_budget, max_clips_per_row=32,
      packing_bins=args.packing_bins, min_frames=args.min_frames, max_frames=args.max_frames,
      min_side=args.min_side, max_side=args.max_side, max_tokens_per_clip=args.max_tokens_per_clip,
      resize=args.resize, worker_count=0, channels=3, max_shapes=2))


def bucket_padding(clip_tokens: np.ndarray, max_tokens: int) -> float:
  buckets = max_tokens // np.array([8, 4, 2, 1])
  padded = buckets[np.searchsorted(buckets, clip_tokens)]
  return float(1 - clip_tokens.sum() / padded.sum())


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--source", default="shapes")
  p.add_argument("--data_dir", default="")
  p.add_argument("--num_clips", type=int, default=4096)
  p.add_argument("--min_frames", type=int, default=4)
  p.add_argument("--max_frames", type=int, default=16)
  p.add_argument("--min_side", type=int, default=16)
  p.add_argument("--max_side", type=int, default=64)
  p.add_argument("--token_budget", type=int, default=4096)
  p.add_argument("--max_tokens_per_clip", type=int, default=1024)
  p.add_argument("--resize", default="cap", choices=loader.RESIZE_POLICIES)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--packing_bins", type=int, default=32)
  p.add_argument("--batches", type=int, default=40)
  args = p.parse_args()

  d, patch_size = data_config(args), (1, 4, 4)
  max_tokens = loader.clip_spec(d, patch_size).max_tokens
  batches = list(itertools.islice(iter(loader.make_dataset(d, patch_size, seed=0)), args.batches))
  padding = float(np.mean([(b["segment_ids"] == 0).mean() for b in batches]))
  grids = np.concatenate([b["clip_grid"].reshape(-1, 3) for b in batches])
  clip_tokens = np.prod(grids[grids[:, 0] > 0], axis=1)
  bucketed = bucket_padding(clip_tokens, max_tokens)
  print(f"{len(clip_tokens)} clips of {clip_tokens.min()}-{clip_tokens.max()} tokens "
        f"(mean {clip_tokens.mean():.0f}) in {args.batches} x {args.batch_size} rows of "
        f"{args.token_budget}: packed padding {padding:.2%}, buckets {bucketed:.2%}")
  print(json.dumps({"benchmark": "packing", "source": args.source,
                    "token_budget": args.token_budget,
                    "resize": args.resize, "max_tokens_per_clip": max_tokens,
                    "clips": int(len(clip_tokens)), "mean_clip_tokens": float(clip_tokens.mean()),
                    "packed_padding": round(padding, 4), "bucket_padding": round(bucketed, 4),
                    "reduction": round(bucketed / max(padding, 1e-9), 1),
                    "goal": "packed_padding <= 0.02 and reduction >= 5",
                    "met": bool(padding <= 0.02 and bucketed >= 5 * padding)}))


if __name__ == "__main__":
  main()
