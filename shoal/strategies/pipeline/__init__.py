"""Pipeline parallelism: the strategy, where to cut the model, and the stage-to-stage sends."""

from shoal.strategies.pipeline.split import measure_block_times, split_balanced
from shoal.strategies.pipeline.strategy import Chunk, Pipeline, PipelinedModel

__all__ = ["Chunk", "Pipeline", "PipelinedModel", "measure_block_times", "split_balanced"]
