"""Training: a sharded jitted step, optax AdamW, orbax checkpoints, metrics, multi-host.

    from retnet_jax.train import TrainConfig, train
    summary = train(TrainConfig(steps=200, workdir="runs/demo"))
    model, tokenizer, cfg = load_trained("runs/demo")

Files: `config.py` (TrainConfig), `optimizer.py`, `state.py` (TrainState and its shardings),
`step.py` (the jitted train and eval steps), `checkpointing.py`, `signals.py`, `metrics.py`,
`evaluation.py`, `mesh.py`, `distributed.py`, `load.py` (load_trained), `report.py`, `loop.py`
(train).
"""

from retnet_jax.train.config import MeshShape, TrainConfig
from retnet_jax.train.evaluation import evaluate_checkpoint
from retnet_jax.train.load import load_trained
from retnet_jax.train.loop import TrainingDiverged, train

__all__ = ["MeshShape", "TrainConfig", "TrainingDiverged", "evaluate_checkpoint", "load_trained", "train"]
