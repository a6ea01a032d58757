"""InceptionResNetV2's forward pass at 299 px on a GPU, in images/s: what the README's
projection for a GPU divides by. Not part of `make bench` (CI has no GPU).

The GPU machine this was measured on has JAX and PyTorch but no TensorFlow, so Keras runs
there on its JAX backend (the same network, built by the same `keras.applications` code;
XLA compiles it, as `jit_compile` would under TensorFlow). Random weights: the speed does
not depend on them.

    KERAS_BACKEND=jax python benchmarks/gpu_forward.py out.json
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

CONFIGS = (("float32", 32), ("float32", 128), ("mixed_bfloat16", 128))
TIMED_BATCHES = 8


def rate(policy: str, batch: int) -> dict:
    import keras

    keras.mixed_precision.set_global_policy(policy)
    model = keras.applications.InceptionResNetV2(weights=None, include_top=False,
                                                 pooling="avg", input_shape=(299, 299, 3))
    pixels = np.random.default_rng(0).uniform(-1, 1, (batch * TIMED_BATCHES, 299, 299, 3))
    pixels = pixels.astype("float32")
    start = time.perf_counter()
    model.predict(pixels[:batch], batch_size=batch, verbose=0)  # compiled once, not timed
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    model.predict(pixels, batch_size=batch, verbose=0)  # host arrays in, as a pipeline feeds
    seconds = time.perf_counter() - start
    return {"policy": policy, "batch": batch, "images_per_s": round(len(pixels) / seconds, 1),
            "first_call_seconds": round(compile_s, 1)}


def main() -> None:
    import keras

    results = {"backend": keras.backend.backend(), "keras": keras.__version__, "runs": []}
    if results["backend"] == "jax":
        import jax

        results["device"] = str(jax.devices()[0])
    for policy, batch in CONFIGS:
        results["runs"].append(rate(policy, batch))
        print(json.dumps(results["runs"][-1]), flush=True)
    with open(sys.argv[1] if len(sys.argv) > 1 else os.devnull, "w") as out:
        json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
