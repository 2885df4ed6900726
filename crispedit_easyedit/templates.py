"""Prompt formats: how an edit's prompt is rendered for training, and how a question is asked at evaluation.

A user asks an edited model a question in some format (bare, inside the paper's QA context, or through the chat
template). An edit trained on the bare prompt alone often shows only in that format, so training can render each
edit in several formats (``CrispEditHyperParams.train_formats``); the evaluation (``bench.evaluation``) asks in the
same formats with the same token ids.

Formats:

* ``"raw"``: the prompt as it is (the training form of EasyEdit's editors);
* ``"qa"``: the WILD QA context of the paper, ``QA_TEMPLATE`` with the right-stripped prompt as the question;
* ``"chat"``: the tokenizer's chat template, the prompt as the user message and the target as the assistant turn,
  which ends with the template's end-of-turn (e.g. ``<|im_end|>``): the model learns to answer and stop;
* a custom format string holding ``{prompt}`` once, e.g. ``"Question: {prompt}\\nAnswer:"``.

Token boundaries are exact: the prompt and the target are tokenised separately and joined as ids. The prompt of
"raw", "qa" and custom formats is tokenised with the tokenizer's special tokens (its BOS, if it adds one); a chat
prompt without them (the template writes BOS and role markers), exactly as ``bench.evaluation.prompt_token_ids``
does when it asks the question.
"""

from __future__ import annotations

from typing import Any

QA_TEMPLATE = "Please answer the question:\n\nQ: {question}\nA:"
"""The paper's QA context (WILD)."""

NAMED_FORMATS: tuple[str, ...] = ("raw", "qa", "chat")
"""The named training formats; anything else must be a format string holding ``{prompt}``."""


def check_format(fmt: Any) -> None:
    """Raise a ValueError naming ``fmt`` and the valid choices unless it is a named format or a format string."""
    if isinstance(fmt, str) and fmt in NAMED_FORMATS:
        return
    if isinstance(fmt, str) and fmt.count("{prompt}") == 1:
        try:
            fmt.format(prompt="x")
        except (IndexError, KeyError, ValueError) as exc:
            raise ValueError(f"train format {fmt!r} is not a valid format string ({exc}); use {{prompt}} once and "
                             f"double other braces") from exc
        return
    raise ValueError(f"unknown train format {fmt!r}; valid: one of {', '.join(NAMED_FORMATS)} or a format string "
                     f"holding {{prompt}} exactly once (e.g. 'Question: {{prompt}}\\nAnswer:')")


def has_chat_template(tok: Any) -> bool:
    """Whether ``tok`` carries a chat template (``tok.chat_template`` is set)."""
    return bool(getattr(tok, "chat_template", None))


def _require_chat_template(tok: Any) -> None:
    if not has_chat_template(tok):
        raise ValueError(f"format 'chat' needs a tokenizer with a chat template, and {type(tok).__name__} has none; "
                         f"use 'raw' or 'qa', or set tok.chat_template")


def chat_prompt_text(tok: Any, question: str) -> str:
    """The chat template's text up to the assistant's answer: the question as the user message + generation prompt."""
    _require_chat_template(tok)
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)


def prompt_text(tok: Any, prompt: str, fmt: str) -> str:
    """The text a format puts before the answer (``prompt`` right-stripped, except for "raw")."""
    check_format(fmt)
    if fmt == "raw":
        return prompt
    if fmt == "qa":
        return QA_TEMPLATE.format(question=prompt.rstrip())
    if fmt == "chat":
        return chat_prompt_text(tok, prompt.rstrip())
    return fmt.format(prompt=prompt.rstrip())


def chat_answer_suffix(tok: Any, question: str, answer: str) -> str:
    """What the chat template writes for the assistant turn ``answer`` after the generation prompt, up to and
    including its end-of-turn marker (the template's trailing white space after it is dropped).

    Raises:
        ValueError: the template renders the conversation with the answer so that it does not extend the generation
            prompt (then the answer's token boundary is not defined).
    """
    head = chat_prompt_text(tok, question)
    full = tok.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                                   tokenize=False)
    if not full.startswith(head) or answer not in full[len(head):]:
        raise ValueError(f"the chat template of {type(tok).__name__} does not render the assistant turn after its "
                         f"generation prompt; use the 'raw' or 'qa' train format")
    return full[len(head):].rstrip()
