"""CrispEdit for EasyEdit: low-curvature projected fine-tuning of LLM weights.

The curvature core (``curvature``, ``projector``, ``optim``, ``editing``) never imports EasyEdit. The adapter in
``crispedit_easyedit.easyedit`` registers the method with EasyEdit when EasyEdit is importable.
"""

__version__ = "0.1.0"
