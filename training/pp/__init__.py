"""Pipeline parallelism: stage splits and the GPipe, 1F1B and interleaved 1F1B schedules."""

from ckptd.training.pp.order import Op, rank_order
from ckptd.training.pp.schedule import PipelineSchedule
from ckptd.training.pp.simulate import bubble_fraction, simulate

__all__ = ["Op", "PipelineSchedule", "bubble_fraction", "rank_order", "simulate"]
