"""`python -m imgclf.export.openvino_job FLOAT_XML COUNT:SIZE:RESIZE FOLDER`:
`formats.write_openvino_int8` in a process of its own (`formats.openvino_int8_quantising`
starts it): the OpenVINO float IR at FLOAT_XML quantised into FOLDER, calibrated on COUNT
training images (evenly spaced), decoded as the pipeline does (the job reads them itself).

The package stage starts it before it loads the model: the job imports OpenVINO and NNCF
and decodes its calibration images meanwhile, then waits for the float IR, which the stage
converts from its own trace of the network (`job.wait_for_input`). It imports no
TensorFlow and loads no Keras model. NNCF's statistics are mostly single-threaded, so on a
machine with a second core the quantisation overlaps the stage's own work instead of
queueing behind it. Standard input closed at any time ends the job with exit code 3.
"""

from __future__ import annotations

import sys
from pathlib import Path

from imgclf.export import job


def main(argv: list[str] | None = None) -> None:
    float_xml, calibration, folder = sys.argv[1:] if argv is None else argv
    # Loaded while the stage loads and traces the network: the libraries, the images.
    import nncf  # noqa: F401

    from imgclf.data.manifests import sample_pixels
    from imgclf.export.formats import write_openvino_int8

    count, size, resize = calibration.split(":")
    pixels = sample_pixels("train", int(count), int(size), resize)
    job.wait_for_input()
    job.run(lambda: write_openvino_int8(Path(float_xml), Path(folder), pixels))


if __name__ == "__main__":
    main()
