"""Adversarial evaluation of test-time adaptation (issue 6).

* :mod:`tta_norm.attacks.malicious`: malicious test samples inside a batch (DIA, Wu et al., ICML 2023; the
  MedBN evaluation, Park et al., CVPR 2024): :class:`MaliciousAttack`, :func:`craft_malicious`,
  :func:`attack_batch` (instant / cumulative threat models).
"""

from tta_norm.attacks.malicious import (
    INITS,
    MODES,
    OBJECTIVES,
    AttackOutcome,
    MaliciousAttack,
    attack_batch,
    attack_loss,
    copy_state,
    craft_malicious,
    init_malicious,
    project_linf,
    unrolled_logits,
)

__all__ = [
    "INITS",
    "MODES",
    "OBJECTIVES",
    "AttackOutcome",
    "MaliciousAttack",
    "attack_batch",
    "attack_loss",
    "copy_state",
    "craft_malicious",
    "init_malicious",
    "project_linf",
    "unrolled_logits",
]
