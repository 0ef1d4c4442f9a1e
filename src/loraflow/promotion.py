"""The promotion gate: when a freshly trained adapter may take the `champion` alias.

Two perplexities are two point estimates; their difference on a few hundred documents can be
noise. The gate compares models *paired, per document*: candidate, base and champion are scored
on the same eval documents (loraflow.evaluation.document_losses), and a paired bootstrap over
documents gives a confidence interval of the token-weighted mean loss difference (nats/token;
exp of it is the perplexity ratio). A candidate is promoted only when

1. it beats the base model with confidence: the interval's upper bound of candidate - base < 0;
2. against the champion (if any), the upper bound of candidate - champion <= log(1 + margin)
   (`registry.promotion_margin`; 0: better than the champion with confidence);
3. its generation health has not regressed past a tolerance against the champion's: the share
   of greedy generations that end with EOS, and distinct-2.

Pure logic on numbers the flow gathers; docs/gate.md explains the defaults.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0  # a fixed seed: the same numbers always give the same verdict


@dataclass(frozen=True)
class Interval:
    """Bootstrap interval of the token-weighted mean loss difference A - B (nats per token)."""

    mean: float
    low: float
    high: float
    documents: int
    tokens: int
    confidence: float
    resamples: int

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("mean", "low", "high"):
            out[key] = round(out[key], 6)
        # The same interval as a perplexity ratio, which is what users compare.
        out["ppl_ratio"] = [round(math.exp(self.low), 6), round(math.exp(self.mean), 6), round(math.exp(self.high), 6)]
        return out

    def describe(self) -> str:
        return (f"perplexity ratio {math.exp(self.mean):.4f}, {100 * self.confidence:.0f}% CI "
                f"[{math.exp(self.low):.4f}, {math.exp(self.high):.4f}] over {self.documents} document chunks / "
                f"{self.tokens:,} predicted tokens")


def paired_bootstrap(losses_a, losses_b, tokens, *, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                     seed: int = SEED) -> Interval:
    """Percentile bootstrap over documents of sum_i n_i (a_i - b_i) / sum_i n_i, where a_i, b_i are
    document i's mean losses under two models and n_i its target tokens. Resampling whole
    documents keeps the tokens of one document together (they are not independent); the
    statistic is exactly the difference of the two eval losses on the full set."""
    import numpy as np

    a, b, n = (np.asarray(x, dtype=np.float64) for x in (losses_a, losses_b, tokens))
    if not (len(a) == len(b) == len(n)) or len(n) == 0:
        raise ValueError(f"paired losses need the same non-empty documents (got {len(a)}, {len(b)}, {len(n)})")
    weighted = (a - b) * n
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    chunk = max(1, 2_000_000 // len(n))  # bounded memory for large eval sets
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, len(n), size=(stop - start, len(n)))
        stats[start:stop] = weighted[idx].sum(axis=1) / n[idx].sum(axis=1)
    alpha = 1 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return Interval(float(weighted.sum() / n.sum()), float(low), float(high), len(n), int(n.sum()),
                    confidence, resamples)


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    candidate_ppl: float
    base_ppl: float
    champion_version: str | None = None
    champion_ppl: float | None = None
    vs_base: dict[str, Any] | None = None
    vs_champion: dict[str, Any] | None = None
    health: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """What the manifest, the run's artifacts and `loraflow versions` record."""
        out = asdict(self)
        out["verdict"] = "promote" if self.promote else "refuse"
        interval = self.vs_base or {}
        out["documents"], out["tokens"] = interval.get("documents"), interval.get("tokens")
        return out

    def refused(self, reason: str) -> GateDecision:
        return replace(self, promote=False, reason=reason)


def _health(result: dict[str, Any] | None) -> dict[str, Any]:
    return ((result or {}).get("generation_health") or {}).get("adapter") or {}


def decide(candidate: dict[str, Any], champion: dict[str, Any] | None = None, *, champion_version: str | None = None,
           margin: float = 0.0, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
           eos_tolerance: float = 0.25, distinct_tolerance: float = 0.1) -> GateDecision:
    """`candidate`: its evaluation (loraflow.evaluation.EvalResult.to_dict(): per-document losses of
    adapter and base, perplexities, generation health). `champion`: the champion's evaluation on
    the same eval documents (None with a `champion_version`: it could not be measured)."""
    cand_ppl, base_ppl = float(candidate["adapter_ppl"]), float(candidate["base_ppl"])
    champ_ppl = float(champion["adapter_ppl"]) if champion else None
    health = {"candidate": _health(candidate), "champion": _health(champion) if champion else None,
              "eos_tolerance": eos_tolerance, "distinct_tolerance": distinct_tolerance}
    decision = GateDecision(False, "", cand_ppl, base_ppl, champion_version, champ_ppl, health=health)
    pct = f"{100 * confidence:.0f}%"

    if not (math.isfinite(cand_ppl) and math.isfinite(base_ppl)):
        return decision.refused(f"perplexity is not finite (adapter {cand_ppl}, base {base_ppl})")
    tokens = candidate["document_tokens"]
    vs_base = paired_bootstrap(candidate["document_losses"], candidate["base_document_losses"], tokens,
                               resamples=resamples, confidence=confidence)
    decision = replace(decision, vs_base=vs_base.to_dict())
    if not vs_base.high < 0:
        return decision.refused(f"adapter does not beat the base model with {pct} confidence: adapter/base "
                                f"{vs_base.describe()} (the upper bound must be below 1)")
    if champion_version is None:
        return replace(decision, promote=True, reason=f"adapter beats the base model with {pct} confidence "
                       f"(adapter/base {vs_base.describe()}); there is no champion yet")
    if champion is None:
        return decision.refused(f"the champion {champion_version} could not be measured on this eval set")
    if list(champion.get("document_tokens") or []) != list(tokens):
        return decision.refused(f"the champion {champion_version} was not scored on the same eval documents")
    vs_champ = paired_bootstrap(candidate["document_losses"], champion["document_losses"], tokens,
                                resamples=resamples, confidence=confidence)
    decision = replace(decision, vs_champion=vs_champ.to_dict())
    if vs_champ.high > math.log1p(margin):
        return decision.refused(f"adapter is not better than champion {champion_version} with {pct} confidence: "
                                f"adapter/champion {vs_champ.describe()} (the upper bound must be at most "
                                f"{1 + margin:g}, registry.promotion_margin={margin:g})")
    cand_h, champ_h = health["candidate"], health["champion"] or {}
    for key, tolerance, what in (("eos_rate", eos_tolerance, "share of generations ending with EOS"),
                                 ("distinct_2", distinct_tolerance, "distinct-2 of the generations")):
        if key in cand_h and key in champ_h and cand_h[key] < champ_h[key] - tolerance:
            return decision.refused(f"generation health regressed against champion {champion_version}: {what} "
                                    f"{cand_h[key]:.3f} vs {champ_h[key]:.3f} (tolerance {tolerance:g})")
    return replace(decision, promote=True, reason=(
        f"adapter beats the base model (adapter/base {vs_base.describe()}) and champion {champion_version} "
        f"(adapter/champion ratio upper bound {math.exp(vs_champ.high):.4f} <= {1 + margin:g}), "
        "with generation health within tolerance"))
