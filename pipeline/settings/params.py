"""Every stage's section of params.yaml at once, with every cross-section check.

The ``prepare`` stage, first in the DAG, loads this, so a fresh ``dvc repro`` fails at once on any bad
setting; every other stage validates only the sections it reads. The ``flows:`` section belongs to the
flows (:mod:`pipeline.flows.settings`), which no stage reads.
"""

from __future__ import annotations

from pipeline.analysis.toy_settings import ToyParams
from pipeline.settings.evaluate import BeforeAndAfter
from pipeline.settings.judge import JudgedPairs
from pipeline.settings.prepare import PrepareParams
from pipeline.settings.report import ReportParams
from pipeline.settings.sampling import OtherSampleParams, SampleParams, VLLMParams
from pipeline.settings.train import ReferenceAndTraining


class Params(JudgedPairs, ReferenceAndTraining, BeforeAndAfter):
    """All sections the stages read."""

    prepare: PrepareParams
    sample: SampleParams
    sample_other: OtherSampleParams
    vllm: VLLMParams
    report: ReportParams
    toy: ToyParams
