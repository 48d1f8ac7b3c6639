"""Client-level differential privacy with Flower's fixed-clipping wrappers.

Each hospital's model update (its weights minus the global weights) is
clipped to L2 norm ``C`` (on the server, or on the hospital with Flower's
``fixedclipping_mod``), the clipped updates are averaged with equal weights,
and Gaussian noise of standard deviation ``z * C / m`` is added to the
average (``z`` the noise multiplier, ``m`` the hospitals sampled per round).
Each round is then a Gaussian mechanism on the set of hospitals with
sensitivity ``C / m``.

What the epsilon reported here means: a *client-level* (hospital-level)
guarantee — the released global models barely change whether or not any one
hospital took part, whatever its data. It is computed by Opacus' RDP
accountant over all rounds run so far, **without** privacy amplification by
sampling (sample rate 1), which holds however hospitals are chosen. Flower
samples a fixed number of hospitals without replacement, not Poisson
sampling, so an amplified figure would not be justified; it is not reported.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)

from common.config import Settings


def sampled_per_round(settings: Settings) -> int:
    """Hospitals Flower samples per training round (``m``)."""
    fed = settings.federation
    return max(int(fed.num_hospitals * fed.fraction_train), fed.min_train)


def wrap_client_level(strategy: Any, settings: Settings) -> Any:
    """Wrap ``strategy`` (weighted by a unit weight) with Flower's DP wrapper."""
    privacy = settings.privacy
    wrapper = (DifferentialPrivacyServerSideFixedClipping if privacy.clipping_side == "server"
               else DifferentialPrivacyClientSideFixedClipping)
    return wrapper(strategy, noise_multiplier=privacy.client_noise_multiplier,
                   clipping_norm=privacy.clipping_norm,
                   num_sampled_clients=sampled_per_round(settings))


def client_level_epsilon(settings: Settings, rounds: int) -> dict[str, float]:
    """Client-level epsilon after ``rounds`` noisy releases (no amplification).

    Returns:
        ``epsilon``, ``delta``, ``noise-multiplier``, ``rounds`` and
        ``sample-rate`` (always 1.0: no amplification assumed). Epsilon is
        infinite when the noise multiplier is 0.
    """
    privacy = settings.privacy
    z = privacy.client_noise_multiplier
    if z <= 0 or rounds <= 0:
        epsilon = float("inf") if rounds > 0 else 0.0
    else:
        from opacus.accountants import RDPAccountant  # ~1 s import: only when needed

        accountant = RDPAccountant()
        accountant.history = [(z, 1.0, rounds)]
        epsilon = float(accountant.get_epsilon(delta=privacy.delta))
    return {"epsilon": epsilon, "delta": privacy.delta, "noise-multiplier": z,
            "rounds": float(rounds), "sample-rate": 1.0}
