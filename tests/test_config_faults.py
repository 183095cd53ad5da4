"""Nonsense configs fail before anything compiles, with one line naming the field (issue 16,
items 4 and 10): the tokenizer and MLLM training configs, `--config.` overrides, LLaVA JSON."""

import subprocess
import sys

import pytest

from dualtoken_jax import config_files
from dualtoken_jax.cli import training as cli_training
from dualtoken_jax.llm import config as llm_config
from dualtoken_jax.mllm import config as mllm_C
from dualtoken_jax.mllm import data as mllm_data
from dualtoken_jax.models import config as model_config
from dualtoken_jax.parallel import sharding
from dualtoken_jax.tokenizer_training import recipe

ConfigError = config_files.ConfigError


def demo():
  return config_files.load("configs/demo_cpu.py:test")


def test_one_config_error_type():
  assert model_config.ConfigError is llm_config.ConfigError is mllm_C.ConfigError
  assert recipe.ConfigError is ConfigError and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("path,value,field", [
    ("optimizer.lr", -1.0, "optimizer.lr"),
    ("optimizer.lr", float("nan"), "optimizer.lr"),
    ("optimizer.warmup_steps", 10_000, "optimizer.warmup_steps"),
    ("optimizer.warmup_steps", -1, "optimizer.warmup_steps"),
    ("stage", 5, "stage"),
    ("total_steps", 0, "total_steps"),
    ("gan.start_step", 1000, "gan.start_step"),
    ("gan.lr", 0.0, "gan.lr"),
    ("checkpoint.every_steps", 0, "checkpoint.every_steps"),
    ("log_every_steps", 0, "log_every_steps"),
    ("eval.every_steps", 0, "eval.every_steps"),
    ("loss.mse", -1.0, "loss.mse"),
    ("loss.semantic.token_cos", -0.5, "loss.semantic.token_cos"),
    ("data.source", "bogus", "data.source"),
    ("batch_size", 0, "batch_size"),
])
def test_tokenizer_config_nonsense_raises_naming_the_field(path, value, field):
  c = demo()
  recipe.validate(c)  # the shipped demo config is fine
  holder = config_files.get_path(c, path.rsplit(".", 1)[0]) if "." in path else c
  holder[path.rsplit(".", 1)[-1]] = value
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    recipe.validate(c)


def test_batch_must_split_over_the_mesh():
  c = demo()
  c.batch_size = 12
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))  # 8 simulated devices
  with pytest.raises(ConfigError, match="batch_size"):
    recipe.validate(c, mesh)


def test_train_and_evaluate_rejects_a_negative_lr_before_building(tmp_path):
  from dualtoken_jax.tokenizer_training.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  c = demo()
  c.optimizer.lr = -1.0
  c.stop_at_step = 1
  with pytest.raises(ConfigError, match="optimizer.lr"):
    train_and_evaluate(c, tmp_path)
  assert not (tmp_path / "checkpoints").exists()


def test_overridden_stage_re_derives_its_fields_but_explicit_ones_win():
  c = config_files.load("dualtoken_tiny")
  c.data.path = "shards.tar"
  c.stage = 2              # as --config.stage=2 would, after the recipe built stage 1
  c.optimizer.b1 = 0.7     # an explicit override of a derived field
  recipe.validate(c)
  stage2 = recipe.training_config(c.model, stage=2)
  assert list(c.frozen) == list(stage2.frozen) and r"decoder/.*" in c.frozen
  assert list(c.update_codebooks) == ["sem"] and not c.gan.enabled and not c.loss.pixel
  assert c.loss.semantic.token_mse == stage2.loss.semantic.token_mse == 0.0
  assert c.optimizer.b1 == 0.7           # explicit: kept
  assert c.optimizer.warmup_steps == 100  # set by the config file: kept
  assert recipe.apply_stage(c) == []      # idempotent
  c.model.layer_sem = 2                   # the stage-0/2 freezing follows layer_sem too
  c.stage = 0
  recipe.validate(c)
  assert list(c.frozen) == recipe.frozen_for_stage(0, 2)


def mllm_config():
  c = config_files.load("mllm_tiny")
  c.text.spm_model, c.data.train = "spm.model", "train.json"
  return c


@pytest.mark.parametrize("path,value,field", [
    ("optimizer.lr", -1e-3, "optimizer.lr"), ("stage", "bogus", "stage"),
    ("batch_size", 0, "batch_size"), ("optimizer.warmup_steps", 10**6, "optimizer.warmup_steps"),
    ("checkpoint.every_steps", 0, "checkpoint.every_steps"), ("loss.text_weight", -1.0, "loss.text_weight")])
def test_mllm_config_nonsense_raises_naming_the_field(path, value, field):
  c = mllm_config()
  mllm_C.validate(c)
  parent, _, leaf = path.rpartition(".")
  (config_files.get_path(c, parent) if parent else c)[leaf] = value
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    mllm_C.validate(c)


def test_mllm_overridden_stage_re_derives_trainable():
  c = mllm_config()
  lr = c.optimizer.lr  # set explicitly by the config file (not the stage's): kept
  c.stage = "alignment"
  mllm_C.validate(c)
  assert list(c.trainable) == [r"projector/.*"] and c.optimizer.lr == lr


def test_unknown_override_names_the_closest_fields():
  argv = ["train", "--config=configs/dualtoken_tiny.py", "--workdir=/tmp/x", "--config.optimizer.lrr=1"]
  message = cli_training.unknown_override(argv)
  assert "optimizer.lrr" in message and "optimizer.lr" in message.split("closest:")[1]
  assert cli_training.unknown_override(argv[:3] + ["--config.optimizer.lr=1"]) is None


def test_unknown_override_is_one_line_not_a_traceback(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "dualtoken_jax.train", "--config=configs/dualtoken_tiny.py",
                         f"--workdir={tmp_path}", "--config.nonexistent=1"],
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and "nonexistent" in proc.stderr.strip().splitlines()[-1]


def test_malformed_llava_json_names_the_file_and_line(tmp_path):
  path = tmp_path / "llava.json"
  path.write_text('[{"image": "a.jpg", "conversations": []},\n {"image": }]\n')
  with pytest.raises(ValueError, match=r"llava\.json: invalid JSON at line 2, column 12"):
    mllm_data.ConversationSource(path)
