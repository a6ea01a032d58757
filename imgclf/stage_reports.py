"""What one stage hands the next: one typed definition per file, read and written through it.

Every writer builds the dataclass and calls `write`; every reader calls `read`, which says
which stage to run when the file is missing or was written by another version of the code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from imgclf import io, paths
from imgclf.errors import UserError


@dataclasses.dataclass(frozen=True)
class StageReport:
    PATH: ClassVar[Path]
    STAGE: ClassVar[str]  # the stage (or command) that writes it

    @classmethod
    def read(cls, path: Path | None = None):
        path = path or cls.PATH
        if not path.is_file():
            raise UserError(f"{path} not found: run the {cls.STAGE} stage first "
                            f"(dvc repro {cls.STAGE})")
        raw = io.read_json(path)
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in raw and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing or not names >= raw.keys():
            raise UserError(f"{path} was written by another version of imgclf (keys "
                            f"{sorted(set(missing) | (raw.keys() - names))}): run the "
                            f"{cls.STAGE} stage again (dvc repro {cls.STAGE})")
        return cls(**raw)

    def write(self, path: Path | None = None) -> None:
        io.write_json(path or self.PATH, dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class TrainReport(StageReport):
    """reports/train.json: the training run and the model file it wrote."""

    PATH: ClassVar[Path] = paths.TRAIN_REPORT
    STAGE: ClassVar[str] = "train"

    run_id: str
    best_epoch: int | None
    monitor: str
    best_value: float | None
    epochs_run: int
    head_epochs_run: int
    epoch_seconds: list[float]
    strategy: str
    workers: int
    weights_digest: str           # of models/model.keras (calibrated)
    trained_weights_digest: str   # before calibration: what every worker prints
    temperature: float
    calibration: dict             # temperature and validation log loss before/after; {} if off
    features_stage_seconds: float | None = None


@dataclasses.dataclass(frozen=True)
class PackageReport(StageReport):
    """reports/package.json: the deployable files made from models/model.keras."""

    PATH: ClassVar[Path] = paths.PACKAGE_REPORT
    STAGE: ClassVar[str] = "package"

    weights_digest: str           # of the model they were made from
    # The serving candidates (paths.SERVING_FORMATS), by format, fastest first: images_per_s
    # (timed on the machine that ran package), size_mb, precision (what the engine computed
    # in, where it chooses), and against Keras on its check sample (formats.check_sample):
    # top1_agreement (decided), features_min_cosine (of the pooled features), checked_images,
    # parity (metrics.parity's keys: what export reports for the copy, not run again there),
    # agrees (both reach their gates: it may serve). Checked fastest first until one agrees:
    # a slower one's agreement keys are None (checked_images 0)
    candidates: dict
    # The SavedModel as loaded back, against Keras on one batch of that sample
    # (formats.checked_saved_model): parity keys of its pixels signature, checked_images,
    # size_mb, bytes_signature_top1_agreement, bytes_signature_images_counted
    saved_model: dict

    def passing(self) -> list[str]:
        """The candidates that may serve."""
        return [fmt for fmt, c in self.candidates.items() if c["agrees"]]


@dataclasses.dataclass(frozen=True)
class RegisterReport(StageReport):
    """reports/register.json: the registered version of the packaged model."""

    PATH: ClassVar[Path] = paths.REGISTER_REPORT
    STAGE: ClassVar[str] = "register"

    run_id: str
    model_uri: str                # models:/m-...
    registered_model: str
    model_version: int
    serving_format: str
    registration_key: str
    weights_digest: str
    serving_reason: str = ""      # why it serves with that format (the model card says it too)
    # images/s of each candidate, as package timed them, when `auto` chose between several
    # (empty otherwise, and when a rerun found the version registered)
    serving_speeds: dict = dataclasses.field(default_factory=dict)

    @property
    def version_uri(self) -> str:
        return f"models:/{self.registered_model}/{self.model_version}"


@dataclasses.dataclass(frozen=True)
class SelectiveReport(StageReport):
    """reports/selective.json: the out-of-distribution score and both thresholds the served
    model applies (models/selective.npz), and how they were chosen on validation."""

    PATH: ClassVar[Path] = paths.SELECTIVE_REPORT
    STAGE: ClassVar[str] = "selective"

    weights_digest: str           # of the model whose features they were fitted on
    ood_method: str
    ood_threshold: float | None   # None: the check is off
    confidence_threshold: float | None
    ood_thresholds: dict          # every method's, at the same share of validation kept
    notes: dict                   # validation coverage, accuracy kept, target reached
