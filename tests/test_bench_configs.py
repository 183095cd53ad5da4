"""The issue-14 comparison configs (`configs/bench_ref_*.py`) have the reference's shapes: the
same parameter counts as the PyTorch reference on those shapes (19,290,885 and 118,682,341),
counted from `jax.eval_shape` (nothing is allocated). SigLIP's logit scale and bias `t`, `b` are
in the tree but frozen in stage 1, hence two fewer trainable parameters."""

import jax
import pytest

from dualtoken_jax import config_files
from dualtoken_jax.tokenizer_training import state as S
from dualtoken_jax.training import optimizer as O


@pytest.mark.parametrize("name,expected", [("s16", 19_290_885), ("b16", 118_682_341)])
def test_reference_shapes_have_the_reference_parameter_counts(name, expected):
  config = config_files.load(f"configs/bench_ref_{name}.py")
  assert config.batch_size == 4 and config.model.text is None and config.stage == 1
  modules = S.Modules(config)
  state, _ = modules.abstract_state()
  masks = modules.masks(state.params)
  trainable, total = O.count_trainable(state.params, masks)
  assert total == expected
  assert trainable == expected - 2
  assert not any(jax.tree.leaves(masks["t"])) and not any(jax.tree.leaves(masks["b"]))
