"""Pick a judge by ``judge.backend`` in ``params.yaml``.

A judge implements :class:`pipeline.judging.types.Judge` (``judge(groups) -> list[Verdict]``):
``rule`` is :class:`pipeline.judging.rule.RuleVerifier`, ``llm`` is
:class:`pipeline.judging.llm.judge.LLMJudge` (imported only when asked for: it loads the HTTP client).
Nothing in :mod:`pipeline.judging` imports this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.judging.rule import RuleVerifier
from pipeline.judging.types import Judge

if TYPE_CHECKING:
    from pipeline.settings.judge import LLMJudgeParams

BACKENDS = ("rule", "llm")


def get_judge(backend: str, *, min_gap: float, llm: LLMJudgeParams | None = None, **kwargs) -> Judge:
    """``rule`` or ``llm``; ``min_gap`` is ``judge.min_gap``, ``llm`` the ``judge.llm`` params (required
    for ``llm``). Other keyword arguments go to the judge's constructor."""
    if backend == "rule":
        return RuleVerifier(min_gap=min_gap, **kwargs)
    if backend == "llm":
        if llm is None:
            raise ValueError("judge.backend: llm needs the judge.llm params (get_judge(..., llm=...))")
        from pipeline.judging.llm.judge import LLMJudge  # lazy: loads the HTTP client

        return LLMJudge(llm, min_gap=min_gap, **kwargs)
    raise ValueError(f"judge.backend: unknown judge {backend!r} (available: {', '.join(BACKENDS)})")
