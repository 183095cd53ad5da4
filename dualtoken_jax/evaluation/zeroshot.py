"""Zero-shot classification with the SigLIP text tower (the reference's / CLIP's protocol).

Classifier: for class c and template t, e_ct = encode_text(tokenize(t.format(name_c))), an
L2-normalised text embedding; w_c = normalise(mean_t normalise(e_ct)). An image embedding x
(L2-normalised MAP-head output) is scored by x · w_c for every class; SigLIP's temperature
and bias, and the reference's factor 100, do not change the ranking and are left out.
Top-k accuracy = fraction of images whose label is among the k highest-scoring classes (ties
broken towards the lower class id, as `jax.lax.top_k`).

Both image paths are scored in the same pass: the *quantised* semantic path (`image_embeds`
of `DualToken.encode`, what DualToken reports) and the unquantised SigLIP
(`DualToken.siglip_embedding` on the same weights, `DualTokenizer.siglip_embedding` in the
public API), so the cost of the semantic quantiser is visible.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from dualtoken_jax.evaluation import imagenet_classes
from dualtoken_jax.evaluation import text


def load_class_names(path: str | os.PathLike | None) -> tuple[str, ...]:
  """One class name per line (blank lines ignored); None -> the 1000 ImageNet names."""
  if path is None:
    return imagenet_classes.CLASSNAMES
  with open(path, encoding="utf-8") as f:
    names = tuple(line.strip() for line in f if line.strip())
  if not names:
    raise ValueError(f"class name file {path} is empty (expected one class name per line, in "
                     "label-id order)")
  return names


def check_class_names(names: Sequence[str], num_classes: int | None, class_folders=(),
                      source: str = "the data") -> None:
  """Raises when the class list cannot name the source's label ids."""
  if num_classes is not None and num_classes != len(names):
    folders = (f" (class folders {', '.join(class_folders[:5])}"
               f"{', …' if len(class_folders) > 5 else ''})") if class_folders else ""
    raise ValueError(f"the class list has {len(names)} names but {source} has {num_classes} "
                     f"classes{folders}: label ids 0..{num_classes - 1} must index the class "
                     "list (pass --class_names with one name per label id, in id order)")


def check_labels(labels: np.ndarray, keys: Sequence[str], num_classes: int) -> None:
  """Raises on a label id outside [0, num_classes), naming the first offending image."""
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"image {str(keys[i])!r} has label id {int(labels[i])}, outside the class "
                     f"list's 0..{num_classes - 1}: the class list does not match the data's label ids "
                     "(pass --class_names with one name per label id)")


def prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
  """Class-major prompt list: [t.format(c) for c in classes for t in templates]."""
  return [t.format(c) for c in class_names for t in templates]


def class_embeddings(text_embeds: np.ndarray) -> np.ndarray:
  """(C, T, D) prompt embeddings -> (C, D): normalise each, mean over T, normalise again."""
  e = np.asarray(text_embeds, np.float32)
  if e.ndim != 3:
    raise ValueError(f"expected (classes, templates, dim) embeddings, got shape {e.shape}")
  return text.l2_normalize(text.l2_normalize(e).mean(axis=1))


def build_classifier(model, variables, tokenizer: text.SigLIPTokenizer,
                     class_names: Sequence[str], mesh,
                     templates: Sequence[str] = imagenet_classes.TEMPLATES,
                     batch_size: int = 256) -> np.ndarray:
  """The (C, D) zero-shot weights from the text tower (module docstring)."""
  tokens = tokenizer(prompts(class_names, templates))
  embeds = text.encode_texts(model, variables, tokens, mesh, batch_size)
  return class_embeddings(embeds.reshape(len(class_names), len(templates), -1))


def topk_correct(topk_ids: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """bool (N,): label among the first k of each row of predicted class ids (N, >= k)."""
  topk_ids = np.asarray(topk_ids)
  if topk_ids.shape[1] < k:
    raise ValueError(f"need at least {k} predictions per image, got {topk_ids.shape[1]}")
  return np.any(topk_ids[:, :k] == np.asarray(labels)[:, None], axis=1)


def accuracy(topk_ids: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[str, float]:
  """{"top1": %, "top5": %} over the images (NaN when there are none)."""
  n = len(labels)
  return {f"top{k}": (100.0 * float(np.mean(topk_correct(topk_ids, labels, k))) if n else
                      float("nan")) for k in ks if np.shape(topk_ids)[-1] >= k}
