"""Pipeline parallelism: stage splits and the GPipe and 1F1B micro-batch schedules."""

from ckptd.training.pp.schedule import PipelineSchedule

__all__ = ["PipelineSchedule"]
