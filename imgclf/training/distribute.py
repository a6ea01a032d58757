"""`train.strategy`: TensorFlow's own tf.distribute engines, chosen from the params.

- none:         the default strategy (one device).
- mirrored:     MirroredStrategy, synchronous data parallelism over this machine's GPUs.
- multi_worker: MultiWorkerMirroredStrategy over the machines (or processes) that
                TF_CONFIG lists; every worker runs the same `train` stage.
- auto:         multi_worker when TF_CONFIG lists more than one worker, mirrored when this
                machine has several GPUs, else none.

`train.batch_size` is the global batch: Keras splits each batch across the replicas.
Only the chief (worker 0) writes the stage's outputs and talks to MLflow; the other workers
write their checkpoints to a temporary folder of their own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from imgclf.errors import UserError


@dataclass(frozen=True)
class Role:
    """Where this process stands in the cluster."""

    strategy_name: str      # the strategy actually used
    index: int = 0          # worker index in TF_CONFIG (0 when not multi-worker)
    num_workers: int = 1

    @property
    def is_chief(self) -> bool:
        return self.index == 0


def cluster_from_env() -> tuple[int, int] | None:
    """(task index, number of workers) from TF_CONFIG, or None when it defines no cluster."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
        workers = config["cluster"]["worker"]
        task = config["task"]
        index = int(task["index"])
    except (ValueError, KeyError, TypeError):
        raise UserError("TF_CONFIG is not valid JSON of the form {\"cluster\": {\"worker\": "
                        "[\"host:port\", ...]}, \"task\": {\"type\": \"worker\", \"index\": N}}"
                        ) from None
    if task.get("type", "worker") not in ("worker", "chief"):
        raise UserError(f"TF_CONFIG task type {task.get('type')!r} is not supported: "
                        "use 'worker' (worker 0 is the chief)")
    if not 0 <= index < len(workers):
        raise UserError(f"TF_CONFIG task index {index} is outside the {len(workers)} workers")
    return index, len(workers)


def choose(name: str, gpu_count: int, cluster: tuple[int, int] | None) -> str:
    """The strategy `auto` resolves to, or `name` itself after checking it can run here."""
    if name == "auto":
        if cluster is not None and cluster[1] > 1:
            return "multi_worker"
        return "mirrored" if gpu_count > 1 else "none"
    if name == "multi_worker" and cluster is None:
        raise UserError("train.strategy = 'multi_worker' needs TF_CONFIG listing the workers "
                        "and this process's index (see README, 'Several GPUs or machines')")
    return name


def make_strategy(name: str):
    """(tf.distribute strategy, Role). Call before any other TensorFlow work: a
    MultiWorkerMirroredStrategy must be created at program start."""
    import tensorflow as tf

    cluster = cluster_from_env()
    chosen = choose(name, len(tf.config.list_physical_devices("GPU")), cluster)
    if chosen == "multi_worker":
        index, workers = cluster
        patch_keras_for_multi_worker()
        return tf.distribute.MultiWorkerMirroredStrategy(), Role(chosen, index, workers)
    if chosen == "mirrored":
        return tf.distribute.MirroredStrategy(), Role(chosen)
    return tf.distribute.get_strategy(), Role(chosen)


def _local_batch_build(self, iterator=None, data_batch=None):
    """Keras's TensorFlowTrainer._maybe_symbolic_build, building from this worker's own first
    batch instead of `strategy.reduce` over the (x, y) tuple, which fails under
    MultiWorkerMirroredStrategy (keras-team/keras#20585). Only shapes matter here."""
    import tensorflow as tf
    from keras.src import tree

    if self._distribute_strategy is None:
        return
    if iterator is not None:
        for _, _, it in iterator:
            batch = next(it)
            data_batch = tree.map_structure(
                lambda v: (self.distribute_strategy.experimental_local_results(v)[0]
                           if isinstance(v, tf.distribute.DistributedValues) else v), batch)
            break
    with self.distribute_strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def _mean_over_replicas(reduce_per_replica):
    """Keras reduces each step's logs with `strategy.reduce("MEAN", v, axis=0)` under
    MultiWorkerMirroredStrategy, which fails on the scalar losses and metrics it returns;
    the mean over replicas (axis=None) is what the logs mean."""
    import tensorflow as tf
    from keras.src import tree

    def reduce(values, strategy, reduction):
        if reduction in ("auto", "mean"):
            return tree.map_structure(
                lambda v: (strategy.reduce("MEAN", v, axis=None)
                           if isinstance(v, tf.distribute.DistributedValues) else v), values)
        return reduce_per_replica(values, strategy, reduction)

    return reduce


def patch_keras_for_multi_worker() -> None:
    """Two small fixes that let Keras 3's `fit` run under MultiWorkerMirroredStrategy."""
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer, "_imgclf_patched", False):
        return
    trainer.TensorFlowTrainer._maybe_symbolic_build = _local_batch_build
    trainer.reduce_per_replica = _mean_over_replicas(trainer.reduce_per_replica)
    trainer._imgclf_patched = True
