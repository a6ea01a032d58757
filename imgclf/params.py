"""The typed params object: load `params.yaml` once, validate it, flatten it for MLflow.

Every stage calls `load_params()` before any heavy work. A user's mistake (unknown key,
wrong type, out-of-range value) becomes a `UserError` naming the dotted key, the bad
value and what is allowed; the stage wrapper turns that into exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from imgclf.data.images import DEFAULT_MAX_PIXELS
from imgclf.errors import UserError

PARAMS_FILE = "params.yaml"

Fraction = Annotated[float, Field(gt=0, lt=1)]
Epochs = Annotated[int, Field(ge=0)]
LearningRate = Annotated[float, Field(gt=0, le=10)]


class _Section(BaseModel):
    # strict: YAML `"5"` is not silently an int, `true` is not silently 1.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataParams(_Section):
    raw_dir: str = "data/raw"
    labels_csv: str | None = None
    id_column: str = Field("id", min_length=1)
    label_column: str = Field("breed", min_length=1)


class PrepareParams(_Section):
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    min_side: int = Field(32, ge=1)
    workers: int = Field(0, ge=0)
    near_duplicate_distance: int | None = Field(4, ge=0, le=32)
    near_duplicate_conflicts: Literal["exclude", "keep"] = "exclude"


class SplitParams(_Section):
    seed: int = 42
    val: Fraction = 0.15
    test: Fraction = 0.15


class AugmentParams(_Section):
    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "horizontal"
    rotation: float = Field(0.05, ge=0, le=0.5)
    zoom: float = Field(0.1, ge=0, lt=1)
    translation: float = Field(0.1, ge=0, le=0.5)
    contrast: float = Field(0.1, ge=0, le=1)
    brightness: float = Field(0.1, ge=0, le=1)
    seed: int = 7
    preview_images: int = Field(4, ge=1, le=16)
    preview_views: int = Field(5, ge=1, le=12)


class ModelParams(_Section):
    image_size: int = Field(299, ge=75, le=1024)
    weights: str | None = "imagenet"
    resize: Literal["stretch", "crop", "pad"] = "crop"
    dropout: float = Field(0.2, ge=0, lt=1)
    dense_units: int = Field(0, ge=0)


class TrainParams(_Section):
    seed: int = 42
    batch_size: int = Field(32, ge=1)
    head_epochs: Epochs = 5
    finetune_epochs: Epochs = 5
    head_lr: LearningRate = 1e-3
    finetune_lr: LearningRate = 1e-5
    unfreeze: int | str = "block8_9_ac"
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0, lt=1)
    lr_schedule: Literal["constant", "cosine", "exponential", "plateau"] = "constant"
    warmup_epochs: Epochs = 0
    decay_rate: float = Field(0.9, gt=0, le=1)
    plateau_factor: float = Field(0.2, gt=0, lt=1)
    plateau_patience: int = Field(2, ge=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weights: Literal["none", "balanced"] = "none"
    monitor: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    early_stopping_patience: Epochs = 3
    resume: bool = True
    calibrate: bool = True
    deterministic: bool = False
    precision: Literal["float32", "mixed_bfloat16", "mixed_float16"] = "float32"
    strategy: Literal["auto", "none", "mirrored", "multi_worker"] = "auto"


class FeaturesParams(_Section):
    cache: bool = True
    views: int = Field(1, ge=1, le=16)
    seed: int = 42
    dtype: Literal["float16", "float32"] = "float16"
    max_gb: float = Field(20.0, gt=0)


class SelectiveParams(_Section):
    ood: bool = True
    ood_method: Literal["knn", "mahalanobis", "energy"] = "knn"
    ood_keep: float = Field(0.95, gt=0, le=1)
    unsure: bool = True
    target_accuracy: float = Field(0.95, gt=0, le=1)


class EvaluateParams(_Section):
    tta: bool = False
    batch_size: int = Field(32, ge=1)
    ood_dir: str | None = None


class PackageParams(_Section):
    openvino: list[Literal["float", "int8"]] = ["float", "int8"]
    calibration_images: int = Field(100, ge=1, le=1000)


class ExportParams(_Section):
    tflite: list[Literal["float32", "dynamic", "float16", "int8"]] = ["dynamic"]
    calibration_images: int = Field(100, ge=1)
    parity_images: int = Field(256, ge=1)
    measure: bool = False
    bench_batch_size: int = Field(32, ge=1)


class MlflowParams(_Section):
    experiment: str = Field("imgclf", min_length=1)
    model_name: str = Field("imgclf", min_length=1)
    serving_format: Literal["auto", "keras", "tflite_dynamic", "openvino",
                            "openvino_int8"] = "auto"


class Params(_Section):
    data: DataParams = DataParams()
    prepare: PrepareParams = PrepareParams()
    split: SplitParams = SplitParams()
    augment: AugmentParams = AugmentParams()
    model: ModelParams = ModelParams()
    features: FeaturesParams = FeaturesParams()
    train: TrainParams = TrainParams()
    selective: SelectiveParams = SelectiveParams()
    evaluate: EvaluateParams = EvaluateParams()
    package: PackageParams = PackageParams()
    export: ExportParams = ExportParams()
    mlflow: MlflowParams = MlflowParams()

    def flat(self) -> dict[str, Any]:
        """Dotted names (`train.finetune_lr`), as `dvc exp show` shows them, for MLflow."""
        return flatten(self.model_dump())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# Keys that moved: a params.yaml from before says where they went, not just "unknown".
MOVED = {"train.cache_features": "features.cache", "train.cache_views": "features.views"}


def _describe(error: dict[str, Any]) -> str:
    # Every param is section.key: deeper loc parts are pydantic's union/list branch names.
    loc = [str(part) for part in error["loc"]][:2]
    key = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden" and key in MOVED:
        return f"{key} is now {MOVED[key]} (the features stage's section): rename it"
    if error["type"] == "extra_forbidden":
        section = Params.model_fields.get(loc[0]) if len(loc) == 2 else None
        fields = section.annotation.model_fields if section else Params.model_fields
        allowed = sorted(fields)
        return f"unknown key {key} (allowed: {', '.join(allowed)})"
    if error["type"] == "missing":
        return f"missing key {key}"
    value = error.get("input")
    return f"{key} = {value!r} is not allowed: {error['msg'][0].lower()}{error['msg'][1:]}"


def validate(raw: Any) -> Params:
    """Build the frozen Params from a parsed YAML mapping, or raise UserError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{PARAMS_FILE} must be a mapping of sections, got {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        errors = err.errors()
        keys = {tuple(e["loc"][:2]) for e in errors}
        more = f" (and {len(keys) - 1} more problem(s))" if len(keys) > 1 else ""
        raise UserError(f"{PARAMS_FILE}: {_describe(errors[0])}{more}") from None
    split = params.split
    if split.val + split.test >= 1:
        raise UserError(
            f"{PARAMS_FILE}: split.val + split.test = {split.val} + {split.test} is not allowed: "
            "must be < 1 so that some images are left for training"
        )
    if isinstance(params.train.unfreeze, int) and params.train.unfreeze < 0:
        raise UserError(
            f"{PARAMS_FILE}: train.unfreeze = {params.train.unfreeze} is not allowed: "
            "use a count of top layers >= 0 or a layer name"
        )
    return params


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: run from the project root (where dvc.yaml is)")
    try:
        # YAML 1.2 (as DVC writes it): `1e-4` is a float, not a string as in PyYAML.
        raw = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    except YAMLError as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{path} is not valid YAML: {first}") from None
    return validate(raw)


def configured_model_name() -> str:
    """The registered model the CLI works on when not told: `mlflow.model_name` of the
    params.yaml here, or its default outside a project folder."""
    if Path(PARAMS_FILE).is_file():
        return load_params().mlflow.model_name
    return MlflowParams().model_name
