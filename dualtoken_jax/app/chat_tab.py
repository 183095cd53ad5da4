"""The Chat tab: an image and questions about it, answered by the unified model token by token
(`UnifiedModel.stream_answer`), with the `chat` CLI's prompt template (`sequence.build_prompt`)
and the earlier turns of the conversation as its history. A question about another image than
the chat's starts a new chat (the image belongs to the first question).
"""

from __future__ import annotations

import gradio as gr

from dualtoken_jax.app.inputs import ImageFile, read_image

EMPTY_ANSWER = "(the model ended its answer at once)"


def sampling_options(temperature: float, top_p: float) -> dict:
  """Slider values -> `answer`'s options: temperature 0 = greedy, top-p 1 = off."""
  return dict(temperature=float(temperature), top_p=None if float(top_p) >= 1.0 else float(top_p))


def messages(history: list[tuple[str, str]]) -> list[dict]:
  """(question, answer) turns as the Chatbot's messages."""
  out = []
  for question, answer in history:
    out += [{"role": "user", "content": question},
            {"role": "assistant", "content": answer or EMPTY_ANSWER}]
  return out


def build(loaded, photos: dict[str, str]) -> None:
  with gr.Tab("Chat", id="chat"):
    if loaded.model is None:
      gr.Markdown(loaded.problem, elem_id="chat-problem")
      return
    model = loaded.model
    size = model.config.model.tokenizer.image_size
    gr.Markdown(f"Unified model: `{loaded.source}`. Ask about an image (or about nothing: the "
                "chat works without one). Answers appear as they are written.")
    chat = gr.State({"image": None, "turns": []})
    with gr.Row():
      with gr.Column(scale=1):
        image = ImageFile(label="Image", type="filepath", image_mode=None,
                          sources=["upload", "clipboard"], format="png", height=240,
                          elem_id="chat-image")
        photo = gr.Dropdown(choices=list(photos), value=None, label="…or a bundled photo",
                            elem_id="chat-photo")
        temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")
        top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.01, label="top-p (1 = off)")
        max_new_tokens = gr.Slider(1, 256, value=64, step=1, label="max new tokens")
        seed = gr.Number(0, precision=0, label="seed")
      with gr.Column(scale=2):
        chatbot = gr.Chatbot(label="Chat", height=380, elem_id="chat-log")
        question = gr.Textbox(label="Question", placeholder="What is in this picture?",
                              elem_id="chat-question")
        with gr.Row():
          send = gr.Button("Send", variant="primary", elem_id="chat-send")
          clear = gr.Button("Clear", elem_id="chat-clear")

    def respond(text, path, state, temperature, top_p, max_new_tokens, seed):
      text = (text or "").strip()
      if not text:
        raise gr.Error("Type a question first.")
      picture = None if not path else read_image(path, size)
      turns = state["turns"] if state["image"] == path else []
      asked = messages(turns) + [{"role": "user", "content": text}]
      yield asked + [{"role": "assistant", "content": "…"}], state, ""
      answer = ""
      try:
        for answer in model.stream_answer(text, picture, history=turns,
                                          max_new_tokens=int(max_new_tokens), seed=int(seed or 0),
                                          **sampling_options(temperature, top_p)):
          # a new list each time: Gradio streams the difference to the previous value
          yield asked + [{"role": "assistant", "content": answer}], state, ""
      except ValueError as e:  # e.g. a question with several <image> markers
        raise gr.Error(f"The model cannot take this question: {e}") from e
      turns = turns + [(text, answer)]
      yield messages(turns), {"image": path, "turns": turns}, ""

    def reset():
      return [], {"image": None, "turns": []}, ""

    inputs = [question, image, chat, temperature, top_p, max_new_tokens, seed]
    outputs = [chatbot, chat, question]
    for asked in (send.click, question.submit):  # Send is disabled while the model answers
      asked(lambda: gr.Button(interactive=False), None, send, queue=False).then(
          respond, inputs, outputs, concurrency_limit=1).then(
          lambda: gr.Button(interactive=True), None, send, queue=False)
    clear.click(reset, None, outputs)
    photo.change(lambda key: photos.get(key) if key else None, photo, image)
