"""`python -m imgclf.export.openvino_job KERAS_FILE CALIBRATION VARIANT=FOLDER...`:
`formats.write_openvino` in a process of its own (`formats.openvino_converting` starts it).

CALIBRATION is `COUNT:SIZE:RESIZE` (int8 is calibrated on COUNT training images, evenly
spaced, decoded as the pipeline does: the job reads them itself) or `-` for none. The
package stage starts it first, before it loads the model itself, and meanwhile writes the
SavedModel, converts the TFLite copy and runs its checks: the converters are mostly
single-threaded, so on a machine with a second core the two overlap instead of queueing.
The job exits as soon as its standard input closes, so a parent that dies (even by SIGKILL)
takes it along instead of leaving it converting into a staging folder nobody reads.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from pathlib import Path


def _exit_with_parent() -> None:
    sys.stdin.buffer.read()  # returns at end of file: the parent closed the pipe or died
    os._exit(3)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    from imgclf.export.formats import write_openvino

    keras_file, calibration, *targets = args
    variants = {v: Path(folder) for v, folder in (t.split("=", 1) for t in targets)}
    code = 0
    try:
        pixels = None
        if calibration != "-":
            from imgclf.data.manifests import sample_pixels

            count, size, resize = calibration.split(":")
            pixels = sample_pixels("train", int(count), int(size), resize)
        write_openvino(Path(keras_file), variants, pixels)
    except BaseException:
        traceback.print_exc()
        code = 1
    # Not a normal interpreter exit: it would wait on the thread's read of stdin, still
    # blocked while the parent holds the pipe open, and abort.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
