"""The ``eval:`` section of the settings file: how runs are compared.

Example::

    eval:
      default_margin: 0.05
      margins: {faithfulness: 0.03}
      floors: {faithfulness: 0.7, answer_relevancy: 0.6}
      pass_threshold: 0.5
      confidence: 0.95
      resamples: 2000

:mod:`eval.compare` explains how margins, floors and the confidence interval
decide a verdict.
"""

from __future__ import annotations

import math

from pydantic import Field, field_validator

from ingestion.config import StrictModel

__all__ = ["EvalConfig"]


class EvalConfig(StrictModel):
    """How a run is compared with its baseline."""

    margins: dict[str, float] = Field(
        default_factory=dict,
        description="Per metric, the smallest drop in mean score worth flagging.",
    )
    default_margin: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="The margin of a metric that has none in 'margins'.",
    )
    floors: dict[str, float] = Field(
        default_factory=dict,
        description="Per metric, the lowest mean score a run may have, whatever "
        "its baseline.",
    )
    pass_threshold: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="A question passes a metric with a score at least this high; "
        "comparisons list the questions that passed before and fail now.",
    )
    confidence: float = Field(
        default=0.95,
        gt=0.5,
        lt=1,
        description="The confidence level of the interval around a mean difference.",
    )
    resamples: int = Field(
        default=2000,
        ge=100,
        le=100_000,
        description="Bootstrap resamples behind each confidence interval.",
    )

    @field_validator("margins")
    @classmethod
    def _check_margins(cls, value: dict[str, float]) -> dict[str, float]:
        for metric, margin in value.items():
            if not math.isfinite(margin) or margin < 0:
                raise ValueError(
                    f"the margin of {metric!r} is {margin}; give a number of 0 or more"
                )
        return value

    @field_validator("floors")
    @classmethod
    def _check_floors(cls, value: dict[str, float]) -> dict[str, float]:
        for metric, floor in value.items():
            if not math.isfinite(floor):
                raise ValueError(f"the floor of {metric!r} must be a finite number")
        return value
