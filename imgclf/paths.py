"""Where stages read and write. dvc.yaml names the same paths (tests check they agree)."""

from pathlib import Path

PREPARED_DIR = Path("data/prepared")
CLASSES_JSON = PREPARED_DIR / "classes.json"
REPORTS_DIR = Path("reports")
PREPARE_REPORT = REPORTS_DIR / "prepare.json"
SPLITS = ("train", "val", "test")


def manifest(split: str) -> Path:
    return PREPARED_DIR / f"{split}.csv"


AUGMENT_PREVIEW = REPORTS_DIR / "augment_preview.png"
# The features stage: the frozen base's outputs per image and view (imgclf.features).
FEATURES_DIR = Path("data/features")
MODELS_DIR = Path("models")
MODEL_FILE = MODELS_DIR / "model.keras"
# The package stage's deployable files, written once: the SavedModel (what every TFLite and
# OpenVINO copy is converted from, and what export ships), the serving candidates and the
# Keras model's test-split probabilities, what evaluate and export compare every format with.
SAVED_MODEL_DIR = MODELS_DIR / "saved_model"
SERVING_COPY = MODELS_DIR / "model_dynamic.tflite"
# The OpenVINO serving candidates (package.openvino), a folder each (model.xml + model.bin).
OPENVINO_DIR = MODELS_DIR / "openvino"
# Every format the registered model may serve with, and where package wrote it.
SERVING_FORMATS = {"tflite_dynamic": SERVING_COPY, "openvino": OPENVINO_DIR / "float",
                   "openvino_int8": OPENVINO_DIR / "int8"}
KERAS_TEST_PROBS = MODELS_DIR / "keras_test_probs.npz"
PACKAGE_REPORT = REPORTS_DIR / "package.json"
CHECKPOINTS_DIR = MODELS_DIR / "checkpoints"
RESUME_DIR = CHECKPOINTS_DIR / "last"
# Written only when the tracking server went away: what `imgclf relog` still has to send.
MLFLOW_PENDING = MODELS_DIR / "mlflow_pending.json"
TRAIN_REPORT = REPORTS_DIR / "train.json"
# The trained model's pooled features of the train and validation images (train), and what
# the selective stage fits on them: the out-of-distribution scores and both thresholds.
EMBEDDINGS = MODELS_DIR / "embeddings.npz"
SELECTIVE = MODELS_DIR / "selective.npz"
SELECTIVE_REPORT = REPORTS_DIR / "selective.json"
# The registered version of the trained model (the register stage).
REGISTER_REPORT = REPORTS_DIR / "register.json"
TRAIN_METRICS = REPORTS_DIR / "train_metrics.json"
TRAIN_HISTORY = REPORTS_DIR / "plots" / "train_history.csv"
TRAIN_CURVES = REPORTS_DIR / "train_curves.png"
METRICS = REPORTS_DIR / "metrics.json"
PER_CLASS = REPORTS_DIR / "per_class.csv"
CONFUSED_PAIRS = REPORTS_DIR / "confused_pairs.csv"
# Every misclassified test image, worst first: the list to check labels from.
ERRORS_CSV = REPORTS_DIR / "errors.csv"
CONFUSION_CSV = REPORTS_DIR / "plots" / "confusion.csv"
EVAL_FIGURES = REPORTS_DIR / "figures"
RISK_COVERAGE = REPORTS_DIR / "plots" / "risk_coverage.csv"
OOD_METHODS = REPORTS_DIR / "ood_methods.csv"
EXPORT_DIR = MODELS_DIR / "export"
EXPORT_REPORT = REPORTS_DIR / "export.json"
