"""The one definition of each enumerated setting (imported by hparams, curvature, optim and the harness)."""

FISHER_TYPES: tuple[str, ...] = ("mc", "empirical")
"""'mc': labels sampled from the model (the GNH, the paper's choice); 'empirical': the true next tokens."""

PROJECTION_MODES: tuple[str, ...] = ("gradient", "update", "both", "eigenbasis", "none")
"""What is projected: the gradient, Adam's update, both, Adam run on the masked gradient in the Kronecker eigenbasis
(one rotation and one unrotation per step), or nothing (plain fine-tuning)."""

CURVATURE_AT: tuple[str, ...] = ("base", "current")
"""Where the capability curvature is taken: the unedited weights theta_0, or the weights as they are now."""

CURVATURE_FACTORS: tuple[str, ...] = ("kfac", "activation")
"""Which curvature builds the projector: 'kfac' = A (x) S (CrispEdit); 'activation' = A (x) I, the activation
covariance alone (Adam-NSCL's / AlphaEdit's input-side nullspace, paper Proposition 1): whole eigendirections of A
are removed, for every output row alike."""

ADAM_SCALINGS: tuple[str, ...] = ("elementwise", "per_matrix")
"""Adam's second moment: one per weight entry (Adam), or one per weight matrix, the running mean of the squared
gradient over its entries, so that each step is the momentum scaled by one number and stays in the span of the
(projected) gradients instead of being reshaped entry by entry."""

GRADIENT_PROJECTION_DTYPES: tuple[str, ...] = ("basis", "bfloat16", "auto")
"""Precision of the gradient's projection (modes "gradient", "both") or rotation (mode "eigenbasis"): the eigenbasis'
own dtype, bfloat16 matmuls (about 4x faster with native bf16; the step's projection stays in the basis dtype, so
"both" and "eigenbasis" still leak nothing), or "auto": bfloat16 where the device multiplies it natively, else the
basis dtype (``crispedit_easyedit.precision``)."""

EDIT_POSITIONS: tuple[str, ...] = ("all", "subject_last", "subject_last_only")
"""Where an edit's gradient reaches the edited weights: every position of the prompt and target (fine-tuning), or
only the subject's last token (ROME/MEMIT's key position; ``crispedit_easyedit.key_positions``), with the weight
change acting at every position of the training forward ("subject_last") or only at that token ("subject_last_only")."""

MOM2_CHAT_FORMATS: tuple[str, ...] = ("chat", "raw")
"""How the prompts of ``mom2_chat_source`` are rendered for the capability statistics: through the tokenizer's chat
template with the generation prompt (questions as users ask them), or as raw text (completion prompts such as
CounterFact's neighbourhood prompts, whose last position predicts the object)."""

CONTEXT_NULL_SPACE_COMPOSITIONS: tuple[str, ...] = ("alternate", "exact")
"""How a step is projected under both the capability projection and the context null space
(``crispedit_easyedit.context_null_space``): 'alternate' projections, ``context_null_space_rounds`` of each in turn
(the change ends in the context null space, part of it in the capability projection's removed directions), or
'exact', the orthogonal projection onto the intersection of the two subspaces, computed row by row in the Kronecker
eigenbasis (nothing in either removed set)."""
