"""Text↔image retrieval recall@K (the Flickr / COCO protocol of CLIP-style evaluations).

Gallery: the N evaluated images that have at least one caption; queries: their M captions
(Flickr8K/30K: 5 per image). Similarity s(c, i) = text_c · image_i, both L2-normalised.

* text→image R@K: the fraction of captions whose own image is among the K most similar
  images. rank(c) = #{images i' : s(c, i') > s(c, i_c)}; hit iff rank(c) < K.
* image→text R@K: the fraction of images for which *any* of their captions is among the K
  most similar captions (the standard multi-caption rule). With s*_i = max over the image's
  captions of s(c, i): rank(i) = #{captions c' : s(c', i) > s*_i}; hit iff rank(i) < K.

Ties: only strictly greater scores outrank (ties count in the query's favour, as in the
CLIP-style evaluations: rank = the number of strictly better candidates). Ties are real, not
hypothetical: datasets repeat captions across images ("A dog runs through the grass."),
captions that differ only in characters the tokenizer drops become the same token ids, and
duplicate images (or a collapsed quantizer) give equal image embeddings. For the rule to hold,
equal inputs must get bit-identical scores, and a plain `txt @ img.T` does not give that: BLAS
computes rows at different positions of a matrix product with different blockings, so two equal
caption embeddings can score an image 1 ulp apart, and which of them "wins" then depends on the
captions' order and the chunking. So each distinct embedding (caption or image) is scored once,
and equal ones share that score; `evaluate_retrieval` also encodes each distinct token
sequence once, so identical captions get identical embeddings whatever batch or device they
would have landed on.

Recalls are in percent. Computed in float32 numpy, in chunks of distinct captions, so the
M × N score matrix is never held at once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dualtoken_jax.evaluation import text

KS = (1, 5, 10)


def recall_at_k(image_embeds: np.ndarray, text_embeds: np.ndarray, caption_image: np.ndarray,
                ks: Sequence[int] = KS, chunk: int = 4096) -> dict[str, float]:
  """{"t2i_r1": %, …, "i2t_r10": %} (module docstring).

  Args:
    image_embeds: (N, D) L2-normalised image embeddings.
    text_embeds: (M, D) L2-normalised caption embeddings.
    caption_image: (M,) int, the gallery index of each caption's image; every image must own
      at least one caption.
    ks: the K values.
    chunk: distinct captions scored at once.
  """
  img = np.asarray(image_embeds, np.float32)
  txt = np.asarray(text_embeds, np.float32)
  owner = np.asarray(caption_image, np.int64)
  n, m = len(img), len(txt)
  if owner.shape != (m,):
    raise ValueError(f"caption_image must have shape ({m},), got {owner.shape}")
  if n == 0 or m == 0:
    raise ValueError(f"retrieval needs images and captions, got {n} images and {m} captions")
  if owner.min() < 0 or owner.max() >= n:
    raise ValueError(f"caption_image must index the {n} images, got values in "
                     f"[{owner.min()}, {owner.max()}]")
  if len(np.unique(owner)) != n:
    raise ValueError("every gallery image needs at least one caption")

  # Distinct embeddings, scored once each (module docstring: exact ties).
  img_u, img_of = _distinct_rows(img)    # (U, D); gallery image -> distinct image
  txt_u, txt_of = _distinct_rows(txt)    # (V, D); caption -> distinct caption
  img_mult = np.bincount(img_of, minlength=len(img_u))  # gallery images per distinct image
  txt_mult = np.bincount(txt_of, minlength=len(txt_u))  # captions per distinct caption
  by_txt = np.argsort(txt_of, kind="stable")            # captions grouped by distinct caption
  starts = np.searchsorted(txt_of[by_txt], np.arange(len(txt_u) + 1))

  t2i_rank = np.empty(m, np.int64)
  best = np.full(n, -np.inf, np.float32)  # s*_i
  for s in range(0, len(txt_u), chunk):
    scores = txt_u[s:s + chunk] @ img_u.T                # (c, U)
    caps = by_txt[starts[s]:starts[min(s + chunk, len(txt_u))]]  # the captions of this chunk
    own = scores[txt_of[caps] - s, img_of[owner[caps]]]  # s(c, i_c)
    t2i_rank[caps] = (scores[txt_of[caps] - s] > own[:, None]) @ img_mult
    np.maximum.at(best, owner[caps], own)
  i2t_rank = np.zeros(n, np.int64)
  for s in range(0, len(txt_u), chunk):
    scores = (txt_u[s:s + chunk] @ img_u.T)[:, img_of]  # (c, N), the same values as above
    i2t_rank += txt_mult[s:s + chunk] @ (scores > best[None, :])

  out = {}
  for k in ks:
    out[f"t2i_r{k}"] = 100.0 * float(np.mean(t2i_rank < k))
  for k in ks:
    out[f"i2t_r{k}"] = 100.0 * float(np.mean(i2t_rank < k))
  return out


def _distinct_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(distinct rows of x, index of each row of x among them): x == distinct[index]."""
  distinct, index = np.unique(x, axis=0, return_inverse=True)
  return distinct, index.reshape(-1)


def gallery(image_keys: Sequence[str], pairs: Sequence[tuple[str, str]], lookup
            ) -> tuple[np.ndarray, list[str], np.ndarray, dict[str, int]]:
  """Matches evaluated images with captions.

  Args:
    image_keys: keys of the images that were evaluated (readable), in row order.
    pairs: (image name, caption) from the caption file.
    lookup: source key -> image name in the caption file, or None (`match_caption_images`).

  Returns:
    rows: indices into `image_keys` of the gallery images (those with captions), in order;
    captions: the captions whose image is in the gallery, in file order;
    caption_image: (M,) gallery index of each caption's image;
    counts: images without captions, and captions whose image was not evaluated (missing
      from the data or unreadable).
  """
  row_of_name: dict[str, int] = {}
  for row, key in enumerate(image_keys):
    name = lookup(key)
    if name is not None and name not in row_of_name:
      row_of_name[name] = row
  named = {name for name, _ in pairs}
  used = sorted(row_of_name[nm] for nm in named if nm in row_of_name)
  index_of_row = {row: i for i, row in enumerate(used)}
  captions, owner, orphans = [], [], 0
  for name, caption in pairs:
    row = row_of_name.get(name)
    if row is None:
      orphans += 1
      continue
    captions.append(caption)
    owner.append(index_of_row[row])
  counts = {"images_without_captions": len(image_keys) - len(used),
            "captions_without_image": orphans}
  return np.array(used, np.int64), captions, np.array(owner, np.int64), counts


def evaluate_retrieval(model, variables, tokenizer: text.SigLIPTokenizer, mesh,
                       image_keys: Sequence[str], embeds: dict[str, np.ndarray],
                       pairs: Sequence[tuple[str, str]], lookup,
                       batch_size: int = 256) -> dict:
  """Recall@K for every image-embedding path in `embeds` ({"quantized": (N, D), …})."""
  rows, captions, owner, counts = gallery(image_keys, pairs, lookup)
  if not captions:
    raise ValueError("no evaluated image has a caption: check that the caption file's image "
                     "names match the data's file names")
  # Each distinct token sequence encoded once: identical captions, identical embeddings.
  tokens, token_of = _distinct_rows(tokenizer(captions))
  txt = text.encode_texts(model, variables, tokens, mesh, batch_size)[token_of]
  out = {path: recall_at_k(e[rows], txt, owner) for path, e in embeds.items()}
  out.update(num_images=int(len(rows)), num_captions=len(captions), **counts)
  return out
