"""Pipeline parallelism: the strategy, where to cut the model, tracing a model that is not a Sequential,
the stage-to-stage sends, and the whole model's state gathered from the stages."""

from shoal.strategies.pipeline.model import Chunk, PipelinedModel
from shoal.strategies.pipeline.split import measure_block_times, split_balanced
from shoal.strategies.pipeline.strategy import Pipeline

__all__ = ["Chunk", "Pipeline", "PipelinedModel", "measure_block_times", "split_balanced"]
