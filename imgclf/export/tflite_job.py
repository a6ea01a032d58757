"""`python -m imgclf.export.tflite_job SAVED_MODEL FILE`: the dynamic-range TFLite copy of
the SavedModel folder SAVED_MODEL written at FILE (`formats.write_tflite`), in a process of
its own (`formats.tflite_converting` starts it).

The package stage starts it before the SavedModel exists: it imports TensorFlow meanwhile,
then waits for the folder to be whole (`job.wait_for_input`) before it reads it. The
converter is single-threaded and holds Python's global lock for most of its run, so from a
thread of the stage it would stall the stage's own work; in a process of its own it runs
beside it on a second core. Standard input closed at any time ends the job with exit
code 3.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from imgclf.export import job


def main(argv: list[str] | None = None) -> None:
    saved_model, out = sys.argv[1:] if argv is None else argv
    # TensorFlow imports all of Keras at its own import, to register Keras's optimizers for
    # the SavedModels that hold them; the converter reads the graph and needs none of it.
    # This switch points that import at tf_keras instead; where tf_keras is not installed,
    # TensorFlow skips it.
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    # Imported while the stage writes the SavedModel: the converter's modules, TensorFlow's.
    from tensorflow.lite.python import lite  # noqa: F401

    from imgclf.export.formats import write_tflite

    job.wait_for_input()
    job.run(lambda: write_tflite(Path(saved_model), {"dynamic": Path(out)}))


if __name__ == "__main__":
    main()
