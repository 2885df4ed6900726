"""Evaluation of edited models without EasyEdit: WILD generation, teacher-forced accuracy, capability metrics.

Modules: ``text`` (string metrics), ``prompts`` (WILD templates), ``wild`` (generation and its scores),
``teacher_forced`` (EasyEdit's token_em), ``capability`` (perplexity, KL, lm-eval), ``common`` (shared helpers).
Every public name is re-exported here. Nothing here imports ``easyeditor``.

Definitions (all of them are what the functions below compute):

* **SQuAD normalisation** (``squad_normalize``): lower case, remove ASCII punctuation (``string.punctuation``),
  remove the articles ``a``/``an``/``the`` as whole words, collapse white space. This is the rule of the official
  SQuAD v1.1 script and of EasyEdit's LLM-judge fallback.
* **Exact match** (``exact_match``): the normalised prediction equals a normalised gold answer.
* **Contains** (``contains``): a normalised gold answer occurs in the normalised prediction as a run of whole words
  ("paris" is in "capital is paris" but not in "parisian"). An answer that normalises to the empty string never
  matches.
* **WILD generation** (``wild_generate``), the protocol of the paper (Yang et al., 2025a): greedy decoding of at most
  40 new tokens from the prompt's own tokens, stopping at EOS, and truncating the decoded answer at the first
  ``"."`` or newline. Templates:

  - ``"qa"``: ``"Please answer the question:\\n\\nQ: {question}\\nA:"``
  - ``"none"``: the question alone,
  - ``"chat"``: the tokenizer's chat template with the question as the user message and the generation prompt
    appended. A tokenizer without a chat template is an error for an explicit ``"chat"`` request (a metric is never
    dropped silently); ``wild_scores(templates=None)`` picks ``("qa", "none", "chat")`` when the tokenizer has a
    chat template and ``("qa", "none")`` otherwise, with a logged warning.

  The question is right-stripped, so the prompt never ends in a white-space token (a trailing space token never
  seen in training ruins greedy answers). ``"qa"``/``"none"`` prompts are tokenised with the tokenizer's special
  tokens (BOS where the tokenizer adds one, as in training); chat prompts without them (the template writes them).
* **Reliability / generalisation** (``wild_scores``): WILD answers to the edit prompt / the rephrased prompt scored
  against ``target_new`` by exact match and by contains; generalisation averages over the requests that have a
  ``rephrase_prompt``.
* **Teacher-forced token accuracy** (``teacher_forced_accuracy``): EasyEdit's ``token_em``. The prompt and the
  target are tokenised separately and joined as ids, exactly like training (see ``prompt_target_ids``); the score
  of one example is the share of target tokens that equal the argmax prediction at the preceding position.
  ``teacher_forced_scores`` gives EasyEdit's set on requests without EasyEdit: ``rewrite_acc``, ``rephrase_acc``,
  ``locality_truth_acc`` (locality prompt vs its ground truth, e.g. ZsRE's ``loc_ans``) and, against the stored
  predictions of the unedited model, ``locality_acc``.
* **Perplexity** (``perplexity``): ``exp`` of the token-weighted mean negative log-likelihood of every token whose
  preceding position is also a real (non-pad) token. ``heldout_scores`` gives perplexity, KL and the reference
  log-probs from one forward pass, in row groups that bound the full-vocabulary temporaries.
* **KL** (``mean_kl``/``kl_to_reference``): the mean over all real positions of KL(p_before || p_after) of the
  next-token distributions. With ``top_k`` the reference keeps its top-k log-probabilities plus the remaining mass,
  and the KL is that of the coarse-grained (k + 1)-outcome distributions: a lower bound of the full KL, exact when
  the reference puts no mass outside its top k.
* **Locality**: ``locality_unchanged`` = share of greedy (WILD) answers unchanged by the edit;
  ``locality_token_agreement`` = EasyEdit's teacher-forced locality (share of argmax tokens at the positions of the
  locality answer that are unchanged); ``teacher_forced_accuracy`` on the locality prompt and its ground truth
  (``loc_ans``) before and after the edit gives the teacher-forced locality against the truth.
"""

from __future__ import annotations

from .common import (
    TEMPLATES,
    QA_TEMPLATE,
    STOP_STRINGS,
    Batch,
    model_device,
    eval_mode,
    eos_token_ids,
    chunks,
)
from .text import (
    squad_normalize,
    exact_match,
    contains,
)
from .prompts import (
    has_chat_template,
    format_prompt,
    prompt_token_ids,
    truncate_answer,
)
from .wild import (
    generate_from_ids,
    wild_generate,
    locality_pairs,
    wild_scores,
    locality_unchanged,
)
from .teacher_forced import (
    prompt_target_ids,
    teacher_forced_predictions,
    teacher_forced_accuracy,
    locality_token_agreement,
    teacher_forced_scores,
)
from .capability import (
    HeldoutScores,
    heldout_scores,
    perplexity,
    ReferenceLogprobs,
    next_token_logprobs,
    kl_to_reference,
    mean_kl,
    lm_eval_scores,
)

__all__ = [
    "TEMPLATES",
    "QA_TEMPLATE",
    "STOP_STRINGS",
    "Batch",
    "model_device",
    "eval_mode",
    "eos_token_ids",
    "chunks",
    "squad_normalize",
    "exact_match",
    "contains",
    "has_chat_template",
    "format_prompt",
    "prompt_token_ids",
    "truncate_answer",
    "generate_from_ids",
    "wild_generate",
    "locality_pairs",
    "wild_scores",
    "locality_unchanged",
    "prompt_target_ids",
    "teacher_forced_predictions",
    "teacher_forced_accuracy",
    "locality_token_agreement",
    "teacher_forced_scores",
    "HeldoutScores",
    "heldout_scores",
    "perplexity",
    "ReferenceLogprobs",
    "next_token_logprobs",
    "kl_to_reference",
    "mean_kl",
    "lm_eval_scores",
]
