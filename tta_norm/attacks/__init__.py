"""Adversarial evaluation of test-time adaptation.

* :mod:`tta_norm.attacks.malicious`: malicious test samples inside a batch (DIA, Wu et al., ICML 2023; the
  MedBN evaluation, Park et al., CVPR 2024): :class:`MaliciousAttack`, :func:`craft_malicious`,
  :func:`attack_batch` (instant / cumulative threat models).
* :mod:`tta_norm.attacks.lp`: batch-aware PGD (Linf / L2) on the deployed adapted forward, frozen snapshots of
  adapted models, AutoAttack through the optional ``pyautoattack`` (Croce & Hein, ICML 2020).
* :mod:`tta_norm.attacks.bench` (and :mod:`tta_norm.cli.attack`): the ``tta-norm attack`` grid.
"""

from tta_norm.attacks.lp import deployed_forward, frozen_snapshot, pgd_attack, project, run_autoattack, threat_model
from tta_norm.attacks.malicious import (
    ATTACK_PROTOCOLS,
    INITS,
    MODES,
    OBJECTIVES,
    AttackOutcome,
    Crafted,
    MaliciousAttack,
    attack_batch,
    attack_loss,
    copy_state,
    craft_malicious,
    init_malicious,
    project_linf,
    unrolled_logits,
    victim_predict,
)

__all__ = [
    "ATTACK_PROTOCOLS",
    "INITS",
    "MODES",
    "OBJECTIVES",
    "AttackOutcome",
    "Crafted",
    "MaliciousAttack",
    "attack_batch",
    "attack_loss",
    "copy_state",
    "craft_malicious",
    "deployed_forward",
    "frozen_snapshot",
    "pgd_attack",
    "project",
    "run_autoattack",
    "threat_model",
    "init_malicious",
    "project_linf",
    "unrolled_logits",
    "victim_predict",
]
