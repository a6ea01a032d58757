"""imgclf: image classification by transfer learning with InceptionResNetV2, on DVC and MLflow."""

import os

from imgclf._quiet import quiet_tensorflow_import

# TensorFlow's C++ start-up chatter (oneDNN, CPU feature notes) buries the stage output
# users read; warnings and errors still show. Set TF_CPP_MIN_LOG_LEVEL=0 to see it all.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# MLflow draws a progress bar for every tiny artifact it copies; in stage logs that is noise.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
quiet_tensorflow_import()
