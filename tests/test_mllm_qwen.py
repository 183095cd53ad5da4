"""The MLLM on a Qwen-style decoder with a HF tokenizer.json: ChatML layout, reserved vision
tokens reused, the workdir copy of either tokenizer kind, cached greedy answers equal to the
teacher-forced full pass, and the paper's Qwen2.5 / Llama stage configs."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mllm_testdata as T
from dualtoken_jax import config_files
from dualtoken_jax.data import load_image
from dualtoken_jax.llm import masks
from dualtoken_jax.mllm import config as C
from dualtoken_jax.mllm import inference
from dualtoken_jax.mllm import model as M
from dualtoken_jax.mllm import sequence
from dualtoken_jax.mllm import state as S
from dualtoken_jax.mllm import text_tokenizers
from dualtoken_jax.parallel import sharding
from dualtoken_jax.training.state import state_layout

# Ids 0..5 in this order (the trainer puts special tokens first).
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<unk>"]


def train_hf_tokenizer(path):
  """A small BPE tokenizer.json (Metaspace, like SentencePiece) with Qwen's special tokens."""
  import tokenizers as tk  # pylint: disable=g-import-not-at-top
  tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tk.pre_tokenizers.Metaspace()
  tok.decoder = tk.decoders.Metaspace()
  tok.train_from_iterator(T.corpus(), tk.trainers.BpeTrainer(vocab_size=100,
                                                             special_tokens=SPECIAL))
  tok.save(str(path))
  return path


@pytest.fixture(scope="module")
def hf_file(tmp_path_factory):
  return train_hf_tokenizer(tmp_path_factory.mktemp("hf") / "tokenizer.json")


def qwen_config(hf_file):
  config = config_files.load("mllm_tiny:llm=tiny_qwen2")
  config.model.special_tokens = [list(p) for p in C.special_tokens_for("qwen2.5_3b", "qwen2")]
  config.model.llm.bos_id, config.model.llm.eos_ids, config.model.llm.pad_id = 0, (2, 0), 0
  config.text = C.text_config(tokenizer=str(hf_file), template=C.TEMPLATES["chatml"])
  config.init.tokenizer = T.tokenizer_dir()
  config.data.max_len = 128  # ChatML's system turn and this tokenizer's short pieces
  return config


def test_hf_vocabulary_reuses_qwen_tokens_and_lays_out_chatml(hf_file):
  config = qwen_config(hf_file)
  vocab = sequence.Vocabulary.from_text_config(config.text, config.model.special_tokens)
  assert vocab.kind == text_tokenizers.HF_TOKENIZER and vocab.workdir_file == "tokenizer.json"
  assert (vocab.bos_id, vocab.eos_id, vocab.pad_id) == (0, 2, 0)
  n = vocab.num_pieces
  assert vocab.special == {"image_start": 3, "image_end": 4, "image_gen_start": n,
                           "image_gen_end": n + 1} and vocab.size == n + 2
  vocab.check_llm(config.model.llm)
  assert vocab.decode(vocab.encode("a red flower")) == "a red flower"
  assert vocab.encode("<|im_start|>user")[0] == 1  # added tokens are recognised in text
  layout = sequence.Layout.from_config(config)
  assert not layout.add_bos
  ex = sequence.build_example(vocab, layout, T.conversation(
      "x.png", "What is it?", "a flower")["conversations"], has_image=True)
  tokens = ex["tokens"][ex["input_mask"]]
  prefix = vocab.encode(C.TEMPLATES["chatml"]["prefix"])
  assert list(tokens[:len(prefix)]) == prefix and tokens[0] == 1  # no BOS: <|im_start|>system
  start = list(tokens).index(3)
  assert ex["image_mask"][start + 1:start + 17].all() and tokens[start + 17] == 4
  answer = tokens[ex["loss_mask"][:len(tokens)]]
  assert vocab.decode(answer).strip() == "a flower" and 2 in answer  # <|im_end|> is scored
  again = pickle.loads(pickle.dumps(vocab))  # grain workers
  assert again.encode("a red flower") == vocab.encode("a red flower")


def test_tokenizer_paths_of_either_kind(hf_file, tmp_path):
  spm = T.train_spm(tmp_path / "t.model", T.corpus())
  assert text_tokenizers.resolve(spm)[1] == text_tokenizers.SENTENCEPIECE
  assert text_tokenizers.resolve(hf_file.parent) == (hf_file, text_tokenizers.HF_TOKENIZER)
  (tmp_path / "x").mkdir()
  with pytest.raises(FileNotFoundError, match="neither tokenizer.json"):
    text_tokenizers.resolve(tmp_path / "x")
  assert text_tokenizers.workdir_file(tmp_path / "x") is None
  (tmp_path / "x" / "tokenizer.json").write_bytes(hf_file.read_bytes())
  assert text_tokenizers.workdir_file(tmp_path / "x").name == "tokenizer.json"
  legacy = C.text_config(str(spm))  # the older field still names the file
  assert C.tokenizer_path(legacy) == str(spm)
  with pytest.raises(C.ConfigError, match="config.text.tokenizer must name"):
    C.tokenizer_path(C.text_config())
  with pytest.raises(ValueError, match="has no piece '<|im_end|>'"):
    sequence.Vocabulary.load(spm, C.DEFAULT_SPECIAL_TOKENS, {"eos": "<|im_end|>"})


def test_qwen_mllm_cached_greedy_answer_equals_teacher_forcing(hf_file):
  config = qwen_config(hf_file)
  modules = S.Modules(config)
  mesh = sharding.single_device_mesh()
  state = modules.create(mesh, state_layout(modules, mesh).shardings)
  vocab = sequence.Vocabulary.from_text_config(config.text, config.model.special_tokens)
  chat = inference.UnifiedModel(config, state.params, state.tokenizer, vocab)
  image = load_image(next(iter(T.photos().values())), 32)
  new = chat.generate_ids("What is it?", image, max_new_tokens=6)
  assert new
  prompt = sequence.build_prompt(vocab, chat.layout, "What is it?", has_image=True)
  tokens = np.concatenate([prompt["tokens"], new])[None]
  image_mask = np.concatenate([prompt["image_mask"], np.zeros(len(new), bool)])[None]
  embed = inference._embed  # pylint: disable=protected-access
  x = embed(chat.model, chat.tokenizer, config.model.visual_vector, chat.params,
            chat.tokenizer_variables, jnp.asarray(tokens), jnp.asarray(image_mask),
            jnp.asarray(image)[None])
  valid = jnp.ones(tokens.shape, bool)
  pre, _ = chat.decoder.apply({"params": chat.params["llm"]}, x,
                              masks.positions_from_mask(valid), masks.causal_padding_mask(valid),
                              method=M.GemmaDecoder.transform)
  logits = chat.decoder.apply({"params": chat.params["llm"]}, pre,
                              method=M.GemmaDecoder.compute_logits)
  p = len(prompt["tokens"])
  np.testing.assert_array_equal(np.argmax(logits[0, p - 1:-1], -1), new)


@pytest.mark.parametrize("llm, template, width, vocab, start", [
    ("qwen2.5_3b", "chatml", 2048, 151_936, "<|vision_start|>"),
    ("qwen2.5_7b", "chatml", 3584, 152_064, "<|vision_start|>"),
    ("llama2_7b", "llama2", 4096, 32_004, "<start_of_image>"),
])
def test_paper_stage_configs_of_qwen_and_llama(llm, template, width, vocab, start):
  config = config_files.load(f"mllm_sft:llm={llm}")
  assert (config.model.llm.width, config.model.llm.vocab_size) == (width, vocab)
  assert config.model.llm.scan_layers and config.model.llm.dtype == "bfloat16"
  assert dict(config.text.template) == C.TEMPLATES[template]
  assert dict(config.model.special_tokens)["image_start"] == start
  assert config.model.llm.tie_embeddings == (llm == "qwen2.5_3b")
  if llm == "qwen2.5_3b":  # the paper's decoder is the default of every stage config
    default = config_files.load("mllm_sft")
    assert default.model.llm.to_dict() == config.model.llm.to_dict()
    assert dict(default.text.template) == C.TEMPLATES["chatml"]


def test_qwen_mllm_run_resumes_bitwise_and_keeps_its_tokenizer_json(hf_file, tmp_path):
  """A Qwen-style run with a HF tokenizer.json, interrupted after its step-2 checkpoint, resumes
  to exactly the state of the uninterrupted run; the workdir holds the run's tokenizer.json and
  `UnifiedModel` reads it back from there."""
  import shutil  # pylint: disable=g-import-not-at-top
  from dualtoken_jax.mllm.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  from dualtoken_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  config = qwen_config(hf_file)
  config.data.train = str(T.write_json(tmp_path / "train.json",
                                       T.photo_conversations(T.TRAIN_QUESTIONS[:1])))
  config.total_steps, config.log_every_steps = 4, 1
  config.optimizer.warmup_steps = 1
  config.checkpoint.every_steps, config.checkpoint.keep = 2, 2
  straight = tmp_path / "straight"
  train_and_evaluate(config, straight)
  assert (straight / "tokenizer.json").read_bytes() == hf_file.read_bytes()
  resumed = tmp_path / "resumed"
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")  # as if killed after the step-2 checkpoint
  train_and_evaluate(config, resumed)

  def restore(workdir):
    ckpt = checkpoints.Checkpointer(workdir / "checkpoints", every_steps=1, keep=5)
    state = ckpt.manager.restore(4, args=checkpoints.ocp.args.Composite(
        state=checkpoints.ocp.args.StandardRestore()))["state"]
    ckpt.close()
    return state
  a, b = restore(straight), restore(resumed)
  for name in ("params", "opt_state", "step", "rng"):
    for x, y in zip(jax.tree.leaves(a[name]), jax.tree.leaves(b[name])):
      np.testing.assert_array_equal(x, y, err_msg=name)
  model = inference.UnifiedModel.from_checkpoint(resumed)
  assert model.vocab.kind == text_tokenizers.HF_TOKENIZER
  assert model.vocab.encode("a red flower") == sequence.Vocabulary.from_text_config(
      config.text, config.model.special_tokens).encode("a red flower")
