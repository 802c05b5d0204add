"""`attnmed graft-study`: mediators grafted onto trained full-attention networks against mediators from scratch.

study: the pipeline (train, graft, distill, sample, score); tables: summaries and paired differences; report:
REPORT.md and figures.
"""

from analysis.study.grafting.study import GRAFT_PRESETS, GraftStudy, GraftStudyConfig, run_graft_study

__all__ = ["GRAFT_PRESETS", "GraftStudy", "GraftStudyConfig", "run_graft_study"]
