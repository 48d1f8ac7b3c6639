"""Which of the data's hospitals take part in a run (``data.hospitals``).

The data is always divided among ``federation.num_hospitals`` hospitals;
``data.hospitals`` picks the ones that take part. Leaving one out
(leave-one-hospital-out) therefore changes nothing about the others' splits,
and none of its images reach any training, validation or test split used.
In simulation Flower numbers the SuperNodes ``0..n-1`` (their partition ids);
partition id ``i`` is the ``i``-th hospital taking part.
"""

from __future__ import annotations

from common.config import Settings


def taking_part(settings: Settings) -> list[int]:
    """0-based indices of the hospitals taking part, in order (all when unset)."""
    chosen = settings.data.hospitals
    return list(range(settings.federation.num_hospitals)) if chosen is None else list(chosen)


def left_out(settings: Settings) -> list[int]:
    """0-based indices of the hospitals whose data takes no part in the run."""
    chosen = set(taking_part(settings))
    return [h for h in range(settings.federation.num_hospitals) if h not in chosen]
