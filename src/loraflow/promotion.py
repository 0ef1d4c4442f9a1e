"""The promotion gate: when a freshly trained adapter may take the `champion` alias.

A candidate is promoted only if its perplexity beats the base model's (strictly) and is not worse
than the current champion's on the same eval set, within a relative margin
(`candidate <= champion * (1 + margin)`). Pure logic; the flow gathers the numbers."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    candidate_ppl: float
    base_ppl: float
    champion_version: str | None = None
    champion_ppl: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def decide(candidate_ppl: float, base_ppl: float, *, champion_version: str | None = None,
           champion_ppl: float | None = None, margin: float = 0.0) -> GateDecision:
    def verdict(promote: bool, reason: str) -> GateDecision:
        return GateDecision(promote, reason, candidate_ppl, base_ppl, champion_version, champion_ppl)

    if not (math.isfinite(candidate_ppl) and math.isfinite(base_ppl)):
        return verdict(False, f"perplexity is not finite (adapter {candidate_ppl}, base {base_ppl})")
    if not candidate_ppl < base_ppl:
        return verdict(False, f"adapter perplexity {candidate_ppl:.4f} does not beat the base model's {base_ppl:.4f}")
    if champion_version is None:
        return verdict(True, f"adapter perplexity {candidate_ppl:.4f} beats the base model's {base_ppl:.4f}; "
                             "there is no champion yet")
    if champion_ppl is None or not math.isfinite(champion_ppl):
        return verdict(False, f"the champion {champion_version} could not be measured on this eval set")
    limit = champion_ppl * (1 + margin)
    if candidate_ppl <= limit:
        return verdict(True, f"adapter perplexity {candidate_ppl:.4f} beats the base model's {base_ppl:.4f} and is "
                             f"not worse than champion {champion_version}'s {champion_ppl:.4f} (margin {margin:g})")
    return verdict(False, f"adapter perplexity {candidate_ppl:.4f} is worse than champion {champion_version}'s "
                          f"{champion_ppl:.4f} (margin {margin:g})")
