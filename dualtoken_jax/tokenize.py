"""Tokenise images into DualToken codes.

  python -m dualtoken_jax.tokenize --checkpoint TOKENIZER_DIR photos/ more.jpg --output codes.npz
  python -m dualtoken_jax.tokenize --reference ckpt.pt /data/imagenet/val \
      --output_dir codes/ --format array_record

Inputs are image files, folders (recursive) or `sample` (photos bundled with installed
packages). Images get the eval geometry (shorter side -> image_size, centre crop). Files that
cannot be read (corrupt, empty, not a regular file, over --max_image_bytes) are reported and
skipped; the exit status is 1 if any were skipped. An unwritable output fails at once (status 2).

ArrayRecord shards are written under temporary names and listed in DIR/manifest.json when
complete, so a re-run into the same --output_dir resumes: inputs already in complete shards are
skipped (the new shards may have another --shard_size). --overwrite clears DIR's shards first.

Several processes (`python -m dualtoken_jax.launch … -- dualtoken_jax.tokenize …`, or one per
host of a pod with --distributed) split the inputs: process p of N takes inputs p, p+N, … (of
the full, ordered input list, so every host agrees without talking to the others), skips those
already in any host's complete shards, and encodes the rest on its own local devices (no
collectives). Each writes its own shards `codes-h{p:05d}-*.array_record` and manifest part
`manifest-h{p:05d}.json` into the same --output_dir; `code_shards.read(DIR)` reads the union. A
re-run with any process count resumes after a kill of any of them. An .npz is one file of one
process: with several processes use --format array_record.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np
import tqdm

from dualtoken_jax.cli import outputs
from dualtoken_jax.cli import tokenizer_flags as tokenizer_source
from dualtoken_jax.data import code_shards
from dualtoken_jax.data import decode
from dualtoken_jax.data import image_inputs
from dualtoken_jax.parallel import distributed


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m dualtoken_jax.tokenize", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("inputs", nargs="+", help="image files, folders, or 'sample'")
  tokenizer_source.add_flags(p)
  p.add_argument("--output", help="write all codes to this .npz")
  p.add_argument("--output_dir", help="write ArrayRecord shards here (with --format array_record)")
  p.add_argument("--format", choices=("npz", "array_record"), default="npz")
  p.add_argument("--shard_size", type=int, default=10000)
  p.add_argument("--overwrite", action="store_true",
                 help="array_record: remove the shards already in --output_dir instead of resuming")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--max_image_bytes", type=int, default=decode.DEFAULT_MAX_BYTES,
                 help="larger image files are skipped unread")
  p.add_argument("--distributed", action="store_true",
                 help="join a multi-host job that jax.distributed.initialize() auto-detects "
                      "(Cloud TPU, SLURM); under python -m dualtoken_jax.launch it joins anyway")
  args = p.parse_args(argv)
  if (args.format == "npz") != bool(args.output) or (args.format == "array_record") != bool(args.output_dir):
    p.error("use --output FILE.npz (format npz) or --output_dir DIR with --format array_record")
  if args.shard_size <= 0 or args.batch_size <= 0:
    p.error("--shard_size and --batch_size must be positive")
  if args.output:
    outputs.check(p, "--output", args.output, suffixes=(".npz",))
  else:
    outputs.check(p, "--output_dir", args.output_dir, directory=True)

  distributed.initialize(args.distributed)
  process, processes = jax.process_index(), jax.process_count()
  if args.output and processes > 1:
    p.error(f"--output {args.output}: an .npz is one file written by one process, and this job "
            f"has {processes}; use --format array_record --output_dir DIR (one set of shards "
            "per host, read back as one with code_shards.read(DIR)), or run one process")

  items = image_inputs.collect(args.inputs)
  if processes > 1:  # this host's share, by position in the full list: no coordination needed
    print(f"process {process} of {processes}: inputs {process}, {process + processes}, ... "
          f"({len(items[process::processes])} of {len(items)})")
    items = items[process::processes]
  writer = None
  if args.output_dir:
    try:
      writer = code_shards.ShardWriter(
          args.output_dir, args.shard_size, overwrite=args.overwrite,
          host=process if processes > 1 else None, clean_others=process == 0, hosts=processes)
    except code_shards.ShardDirectoryError as e:
      p.error(str(e))
    done = sum(key in writer.done_keys for key, _ in items)
    if done:
      print(f"resuming: {done} of {len(items)} input(s) are already in the complete shards of "
            f"{args.output_dir}")
      items = [(key, path) for key, path in items if key not in writer.done_keys]
  tok = tokenizer_source.load(args)
  encode = local_encoder(tok)
  keys, pixel, semantic, skipped = [], [], [], []
  with tqdm.tqdm(total=len(items), unit="img", desc="tokenize") as bar:
    try:
      for batch in image_inputs.batches(items, tok.config.image_size, args.batch_size,
                                        max_bytes=args.max_image_bytes):
        for key, reason in batch.skipped:
          tqdm.tqdm.write(f"skipped {key}: {reason}", file=sys.stderr)
        skipped += batch.skipped
        if batch.keys:
          pix, sem = encode(batch.images)
          if writer:
            for k, a, b in zip(batch.keys, pix, sem):
              writer.write(k, a, b)
          else:
            keys += batch.keys
            pixel.append(pix)
            semantic.append(sem)
        bar.update(len(batch.keys) + len(batch.skipped))
    except BaseException:
      if writer:  # the complete shards stay listed in the manifest: a re-run resumes after them
        writer.abort()
      raise
  if writer:
    writer.close()
    print(f"wrote {len(items) - len(skipped)} codes to {len(writer.paths)} new shard(s) in "
          f"{args.output_dir}")
  elif keys:
    code_shards.write_npz(args.output, keys, np.concatenate(pixel), np.concatenate(semantic))
    print(f"wrote {len(keys)} codes to {args.output}")
  if skipped:
    print(f"{len(skipped)} of {len(items)} input(s) could not be read and were skipped", file=sys.stderr)
    return 1
  return 0


def local_encoder(tok):
  """`images -> (pixel, semantic)` codes as numpy, computed on this process's devices only: the
  weights replicated over them, each batch split across them (padded to a multiple of their
  count). Nothing goes to another process's devices, so hosts never wait on each other."""
  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  tok.variables = jax.device_put(tok.variables, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

  def encode(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, pad = len(images), -len(images) % len(devices)
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    codes = tok.encode(jax.device_put(images, rows))
    return np.asarray(codes.pixel)[:n], np.asarray(codes.semantic)[:n]
  return encode


if __name__ == "__main__":
  sys.exit(main())
