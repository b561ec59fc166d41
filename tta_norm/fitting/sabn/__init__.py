"""Sandwich BN heads: training on source domains (:mod:`.heads`), a per-domain statistics bank (:mod:`.bank`),
and test-time routing (:mod:`.router`).

SaBN (Gong, Chen, Chen, Wang -- "Sandwich Batch Normalization", WACV 2022) follows the shared BN affine with an
independent affine per domain: ``y = g_k * (gamma * x_hat + beta) + b_k`` (``AdaptiveNorm.domain_weight`` /
``domain_bias``, shape ``(K, C)``, identity init; ``domain=k`` selects head k, ``None`` the shared affine only).

**Training** (:func:`train_sabn`).  The source data is split into ``K`` domains: ``"clean"`` plus groups of
training-time shift augmentations (:mod:`tta_norm.fitting.augment`; default ``clean, color, blur, noise``).
Batches cycle through the domains (one domain per batch, one magnitude per batch) and are classified with
``domain=k``; the loss is the cross-entropy (Adam, lr 1e-3: with lr 1e-2 the heads overfitted and were worse
than the shared affine alone on held-out images of their own domain).  What is trained: ``"heads"`` (the K
heads), ``"affine"`` (heads + shared gamma/beta, default) or ``"all"`` parameters.  The normalisation
statistics are those of ``preset`` (default ``"sabn"``: the source running statistics, so a head is a learned
per-domain correction of the normalised features -- with fixed statistics a per-channel affine can express any
per-channel re-standardisation; ``"tbn"`` uses batch statistics instead).

**Statistics bank** (:class:`StatsBank`).  For every domain, the pooled mean and variance of the input of every
adaptive norm layer in a *probe* forward pass: the model with the shared affine only (``domain=None``) and no
state commit.  Test batches are probed the same way.

**Routing** (:class:`SaBNRouter`; no public SaBN code routes, all of this is our design):

* ``"oracle"``: the caller passes the true domain index;
* ``"stats"``: the head whose bank entry is nearest to the batch's probe statistics, with the distance
  ``D(batch, k) = sum_layers mean_channels SKL(N(mu_b, var_b) || N(mu_k, var_k))``, the symmetric KL divergence
  ``SKL = (var_b / var_k + var_k / var_b - 2 + (mu_b - mu_k)^2 (1 / var_b + 1 / var_k)) / 2`` between per-channel
  Gaussians (variances + ``eps``);
* ``"entropy"``: the head with the lowest mean prediction entropy on the batch (K extra forward passes);
* ``"open_set"``: as ``"stats"``, but when the nearest distance exceeds ``threshold`` a new head is spawned
  (initialised to the identity, i.e. equal to the shared affine), its bank entry is the batch's statistics,
  and while batches keep routing to it its bank entry follows them (EMA, ``bank_momentum``) and the head is
  adapted online by entropy minimisation (SGD on that head only, ``head_lr``).  Capacity for new heads is
  reserved when the model is built (``max_new_domains``).  The threshold should come from
  :func:`calibrate_threshold` (a quantile of the distances of held-out source batches of each known domain to
  their own entry, at the test batch size); without one, half the smallest distance between two stored domains
  is used, which spawns eagerly.

Probe statistics of very small batches are noisy (at batch size 1 they are one image's spatial statistics,
whose variance is lower than a domain's pooled variance), so stats routing is more reliable at larger batches.
"""

from tta_norm.fitting.sabn.bank import (
    StatsBank,
    calibrate_threshold,
    collect_bank,
    pooled,
    probe_inputs,
    probe_statistics,
    symmetric_kl,
)
from tta_norm.fitting.sabn.heads import (
    DEFAULT_DOMAINS,
    SaBNConfig,
    SaBNResult,
    expand_heads,
    export_head,
    parse_domains,
    synthetic_domains,
    train_sabn,
)
from tta_norm.fitting.sabn.router import ROUTE_MODES, RouteMode, SaBNRouter

__all__ = [
    "DEFAULT_DOMAINS",
    "ROUTE_MODES",
    "RouteMode",
    "SaBNConfig",
    "SaBNResult",
    "SaBNRouter",
    "StatsBank",
    "calibrate_threshold",
    "collect_bank",
    "expand_heads",
    "export_head",
    "parse_domains",
    "pooled",
    "probe_inputs",
    "probe_statistics",
    "symmetric_kl",
    "synthetic_domains",
    "train_sabn",
]
