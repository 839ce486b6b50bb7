"""Choosing concepts from a :class:`~usae.stats.firing.FiringStats`: the energy order and the kinds of Sec. 4.6.

- order: concepts by aggregated energy, descending (the order every gallery and figure uses).
- universal: firing entropy >= 0.9 and co-fire proportion >= 0.5 in every model.
- pairwise: fires fall on exactly two models (M >= 3).
- unique: firing entropy <= 0.2, one dominant model.
- :func:`concept_groups`: disjoint masks of these kinds, plus "even, not co-firing", "other" and "never fired".
- :func:`concept_rows`: each concept's entropy, co-fire proportions, energy and fire counts (``usae concepts``).

Every list of ids comes most energetic first.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from usae.stats.firing import FiringStats

__all__ = ["ConceptRow", "concept_order", "concept_rows", "universal_concepts", "pairwise_concepts", "unique_concepts",
           "concept_groups"]


def concept_order(stats: FiringStats, variant: str = "eq9") -> Tensor:
    """[m] concept ids by aggregated energy, descending (ties: lower id first)."""
    e = stats.aggregated_energy_of(variant, "sum")
    return torch.sort(-e, stable=True).indices


def _ordered(stats: FiringStats, mask: Tensor) -> Tensor:
    order = concept_order(stats)
    return order[mask[order]]


def universal_concepts(stats: FiringStats, min_entropy: float = 0.9, min_cfp: float = 0.5) -> Tensor:
    """Concept ids with entropy >= ``min_entropy`` and CFP >= ``min_cfp`` in every model, by energy."""
    cfp = stats.cofire_proportion.nan_to_num(0.0)
    return _ordered(stats, (stats.entropy.nan_to_num(-1.0) >= min_entropy) & (cfp >= min_cfp).all(0))


def pairwise_concepts(stats: FiringStats, min_pair_mass: float = 0.95,
                      min_share: float = 0.25) -> tuple[Tensor, Tensor]:
    """Concepts whose fires fall on exactly two models: (ids by energy [n], model pairs [n, 2], ascending).

    Kept when the two largest shares hold >= ``min_pair_mass`` of the fires and the smaller of them is
    >= ``min_share``; the uniform two-model case has entropy log 2 / log M (0.631 for M = 3).
    """
    if stats.n_models < 3:
        raise ValueError(f"pairwise concepts need >= 3 models; got {stats.n_models} ({list(stats.names)})")
    p = stats.fire_distribution.nan_to_num(0.0)
    top2 = p.topk(2, dim=0)
    mask = (top2.values.sum(0) >= min_pair_mass) & (top2.values[1] >= min_share) & ~stats.never_fired
    ids = _ordered(stats, mask)
    return ids, top2.indices[:, ids].T.sort(dim=1).values


def unique_concepts(stats: FiringStats, max_entropy: float = 0.2) -> tuple[Tensor, Tensor]:
    """Model-unique concepts (Sec. 4.6): entropy <= ``max_entropy``; (ids by energy [n], dominant model [n])."""
    ids = _ordered(stats, stats.entropy.nan_to_num(math.inf) <= max_entropy)
    return ids, stats.fire_distribution[:, ids].argmax(0)


def concept_groups(stats: FiringStats, min_entropy: float = 0.9, min_cfp: float = 0.5,
                   max_entropy: float = 0.2) -> dict[str, Tensor]:
    """[m] bool masks of disjoint concept kinds: ``"universal"`` (entropy >= ``min_entropy`` and CFP >=
    ``min_cfp`` in every model), ``"even, not co-firing"`` (entropy >= ``min_entropy``, not universal),
    ``"pairwise"`` (see :func:`pairwise_concepts`), ``"unique"`` (entropy <= ``max_entropy``), ``"other"``
    (fires, none of these) and ``"never fired"``."""
    m = stats.n_latents
    universal = torch.zeros(m, dtype=torch.bool)
    universal[universal_concepts(stats, min_entropy, min_cfp)] = True
    even = (stats.entropy.nan_to_num(-1.0) >= min_entropy) & ~universal
    pair = torch.zeros(m, dtype=torch.bool)
    if stats.n_models >= 3:
        pair[pairwise_concepts(stats)[0]] = True
    unique = (stats.entropy.nan_to_num(math.inf) <= max_entropy) & ~pair
    pair &= ~universal & ~even
    never = stats.never_fired
    other = ~(universal | even | pair | unique | never)
    return {"universal": universal, "even, not co-firing": even, "pairwise": pair, "unique": unique,
            "other": other, "never fired": never}


class ConceptRow(NamedTuple):
    """One concept's universality profile: ``entropy`` (normalised firing entropy, 1 = even across models),
    ``cfp`` (co-fire proportion per model: share of its fires where every model fires), ``energy`` (aggregated,
    the order of every list), ``fires`` (tokens per model above the threshold)."""

    concept: int
    entropy: float
    cfp: dict[str, float]
    energy: float
    fires: dict[str, int]


def concept_rows(stats: FiringStats, concepts: Tensor | list[int] | None = None, top: int = 20) -> list[ConceptRow]:
    """The profile of ``concepts`` (default: the ``top`` most energetic), in the order given."""
    ids = concept_order(stats)[:top].tolist() if concepts is None else [int(k) for k in concepts]
    bad = [k for k in ids if not 0 <= k < stats.n_latents]
    if bad:
        raise ValueError(f"concepts {bad} are not valid; expected ids in [0, {stats.n_latents})")
    entropy, cfp, energy = stats.entropy, stats.cofire_proportion, stats.aggregated_energy
    return [ConceptRow(k, float(entropy[k]), {n: float(cfp[i, k]) for i, n in enumerate(stats.names)},
                       float(energy[k]), {n: int(stats.fires[i, k]) for i, n in enumerate(stats.names)})
            for k in ids]
