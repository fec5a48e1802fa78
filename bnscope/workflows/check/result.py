"""What ``check`` returns: one ``RuleResult`` per rule and layer, gathered in a ``CheckResult``."""

from __future__ import annotations

from dataclasses import dataclass

from bnscope.schema import SCHEMA_VERSION
from bnscope.stats.summary import StatsResult
from bnscope.workflows.check.config import CheckConfig
from bnscope.workflows.fold import FoldResult
from bnscope.workflows.inspect import InspectResult


@dataclass(frozen=True)
class RuleResult:
    rule: str
    layer: str | None
    passed: bool
    message: str
    unsure: bool = False  # beyond the limit only within the noise (bnscope.stats.gate): passes unless strict
    samples_to_decide: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class CheckResult:
    model: str
    results: tuple[RuleResult, ...]
    not_run: dict
    config: CheckConfig
    inspect: InspectResult | None = None
    stats: StatsResult | None = None
    fold: FoldResult | None = None  # the dry-run fold of fold_verified, for the HTML report

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[RuleResult]:
        return [r for r in self.results if not r.passed]

    def unsure(self) -> dict[str, int | None]:
        """Layers a drift rule found unsure (the gate's warning): layer -> samples that would decide it."""
        out: dict[str, int | None] = {}
        for r in self.results:
            if r.unsure and r.layer is not None:
                out[r.layer] = max(out.get(r.layer) or 0, r.samples_to_decide or 0) or None
        return out

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "passed": self.passed,
            "failures": len(self.failures),
            "results": [r.to_dict() for r in self.results],
            "not_run": [{"rule": k, "why": v} for k, v in self.not_run.items()],
            "diagnosis": [f.to_dict() for f in self.stats.diagnosis] if self.stats is not None else [],
        }


@dataclass(frozen=True)
class CheckResults:
    """``check MODEL...`` over several models: one ``CheckResult`` each, in the order given."""

    results: tuple[CheckResult, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failed(self) -> list[str]:
        return [r.model for r in self.results if not r.passed]

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "passed": self.passed,
            "failed": self.failed,
            "models": [r.to_dict() for r in self.results],
        }
