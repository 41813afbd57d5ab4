"""Distributed evaluation around a model's evaluator: every rank predicts its share of the split
(whole scenes, in time order, temporal state reset first), the evaluator's states are gathered, and
rank 0 scores them."""

from __future__ import annotations

import torch

from raydrive.data.pipeline import FramePipeline


def evaluate(model, evaluator, pipeline: FramePipeline, rank: int, world: int, autocast) -> dict:
    """Returns the evaluator's metrics on rank 0, {} elsewhere."""
    was_training = model.training
    model.eval()
    model.reset_state()
    with torch.no_grad():
        for batch in pipeline.eval_batches(rank, world):
            if batch["seq_start"].any():
                model.reset_state(batch["seq_start"])
            with autocast():
                outputs = model.predict(batch)
            evaluator.process(batch, outputs)
    model.reset_state()
    model.train(was_training)
    states = [evaluator.state()]
    if world > 1:
        import torch.distributed as dist

        states = [None] * world
        dist.all_gather_object(states, evaluator.state())
    return evaluator.evaluate(states) if rank == 0 else {}
