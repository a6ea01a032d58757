"""The registered model: an MLflow pyfunc that takes image files, not tensors.

Input: a DataFrame with a column `image` whose values are base64-encoded file bytes (what
JSON clients send) or raw bytes; never file paths, so that a client of the served model
cannot make the server read its own files. Output per image: `label`, `confidence`,
`top_k` (JSON list of {label, probability}), `status` (`ok`; `unsure`: the confidence is
below the threshold chosen on validation; `unknown`: the image is unlike every class, its
out-of-distribution score above the threshold), `ood_score` and `error` (empty unless the
image could not be read: one bad upload in a batch does not fail the others; its status is
then empty). With the param `probabilities`, also `probabilities` (JSON list, one per class
in `classes` order: what log loss and the Kaggle format need); with `scores`, `scores`
(JSON: every out-of-distribution method's score, what evaluate compares them by). The param
`tta` averages each image with its mirror image. A request with no readable image at all,
or without an `image` column, is refused as a bad request (HTTP 400 when served); with
`reject_unreadable: false` (batch scoring, imgclf/tracking/spark.py) the former answers each
row with its error instead.
Inside: `classes.json`, the decode and resize rules of the pipeline, `selective.npz` (the
scores and thresholds: imgclf/model/selective.py) and what answers requests: the copy the
register stage chose (with `mlflow.serving_format: auto`, the fastest, as the package stage
timed them, of the dynamic-range TFLite and OpenVINO copies that agree with Keras on enough
validation images),
else the `.keras` model. A version served from a copy names its Keras model by URI (an
artifact of the training run) instead of carrying it. The format answers
probabilities and pooled features in one forward pass; the status is numpy on those.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from imgclf.data.images import DEFAULT_MAX_PIXELS, ImageRejected, load_pixels
from imgclf.model.selective import Selective
from imgclf.serving.runners import LoadedModel, in_chunks, mirrored_mean


def image_bytes(value) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if not isinstance(value, str):
        raise ImageRejected("bad_input", f"expected base64 text or bytes, got "
                                         f"{type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRejected("bad_input", "not base64-encoded image bytes") from None


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import threading

        self.classes = json.loads(Path(context.artifacts["classes"]).read_text("utf-8"))
        config = json.loads(Path(context.artifacts["config"]).read_text("utf-8"))
        self.image_size = int(config["image_size"])
        self.resize = config["resize"]
        self.max_pixels = int(config.get("max_pixels", DEFAULT_MAX_PIXELS))
        # Served from Keras, the model is an artifact of the version; served from a TFLite or
        # OpenVINO copy, an artifact of the training run, downloaded only when asked for.
        self._keras_path = context.artifacts.get("keras_model")
        self._keras_uri = config.get("keras_model_uri")
        self._model = None
        # A TFLite interpreter (an OpenVINO infer request) serves one call at a time;
        # servers may call from threads.
        self._lock = threading.Lock()
        self.selective = Selective.load(Path(context.artifacts["selective"]))
        if "served_model" in context.artifacts:
            from imgclf.serving.runners import load_runner

            # The copy register chose among those that agree with the Keras model.
            self.format = config["format"]
            self.forward = load_runner(self.format,
                                       Path(context.artifacts["served_model"])).both
        else:
            from imgclf.serving.runners import keras_forward

            self.format = "keras"
            self.forward = keras_forward(self.model)  # compiled call: faster than predict()

    @property
    def model(self):
        """The Keras model itself (when serving from TFLite: downloaded from the training
        run and loaded on first use; needs TensorFlow and the tracking store)."""
        if self._model is None:
            import tempfile

            import keras
            import mlflow.artifacts

            if self._keras_path:
                self._model = keras.models.load_model(self._keras_path, safe_mode=True)
            else:
                with tempfile.TemporaryDirectory(prefix="imgclf-keras-") as tmp:
                    local = mlflow.artifacts.download_artifacts(artifact_uri=self._keras_uri,
                                                                dst_path=tmp)
                    self._model = keras.models.load_model(local, safe_mode=True)
        return self._model

    def keras_runner(self, source: str, tta: bool = False,
                     features: bool = False) -> LoadedModel:
        """The Keras model inside the version, with the version's decode settings; with
        `features`, its predict is a `runners.Forward` (probabilities and pooled features)."""
        from imgclf.serving.runners import keras_forward, keras_predictor

        predict = keras_forward(self.model, tta) if features else keras_predictor(self.model,
                                                                                  tta)
        return LoadedModel(predict, self.classes, self.image_size, self.resize, source,
                           self.max_pixels)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        # A client's mistake must come back as HTTP 400 with a message (MlflowException with
        # INVALID_PARAMETER_VALUE), not as a 500 with a traceback.
        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
            raise MlflowException("the request needs a column 'image' holding base64-encoded "
                                  "image file bytes", error_code=INVALID_PARAMETER_VALUE)
        params = params or {}
        top_k = int(params.get("top_k", 5))
        full, tta = bool(params.get("probabilities", False)), bool(params.get("tta", False))
        all_scores = bool(params.get("scores", False))
        if top_k < 1:
            raise MlflowException(f"top_k = {top_k}: must be >= 1",
                                  error_code=INVALID_PARAMETER_VALUE)
        values = model_input["image"].tolist()
        pixels, errors = [], []
        for value in values:
            try:
                pixels.append(load_pixels(image_bytes(value), self.image_size, self.resize,
                                          self.max_pixels))
                errors.append("")
            except ImageRejected as err:
                pixels.append(None)
                errors.append(str(err))
        good = [i for i, p in enumerate(pixels) if p is not None]
        if values and not good and bool(params.get("reject_unreadable", True)):
            # Nothing usable at all: a bad request. Mixed batches answer per image instead,
            # so one broken upload does not cost the others their predictions.
            detail = "; ".join(f"image {i}: {e}" for i, e in enumerate(errors[:5]))
            raise MlflowException(f"no readable image in the request ({detail})",
                                  error_code=INVALID_PARAMETER_VALUE)
        probs = np.zeros((len(values), len(self.classes)), dtype=np.float32)
        status = np.full(len(values), None, dtype=object)
        score = np.full(len(values), np.nan)
        every: dict[str, np.ndarray] = {}
        if good:
            batch = np.stack([pixels[i] for i in good]).astype(np.float32)
            forward = mirrored_mean(self.forward) if tta else self.forward
            with self._lock:
                probs[good], features = in_chunks(forward, batch)
            status[good], score[good] = self.selective.status(probs[good], features)
            every = self.selective.scores(features) if all_scores else {}
        columns = (["label", "confidence", "top_k", "status", "ood_score", "error"]
                   + (["probabilities"] if full else []) + (["scores"] if all_scores else []))
        rows, where = [], {index: row for row, index in enumerate(good)}
        for i in range(len(values)):
            if errors[i]:
                rows.append({"label": None, "confidence": None, "top_k": "[]", "status": None,
                             "ood_score": None, "error": errors[i], "probabilities": "[]",
                             "scores": "{}"})
                continue
            order = np.argsort(-probs[i])[:top_k]
            rows.append({
                "label": self.classes[order[0]],
                "confidence": float(probs[i, order[0]]),
                "top_k": json.dumps([{"label": self.classes[j],
                                      "probability": round(float(probs[i, j]), 6)}
                                     for j in order], ensure_ascii=False),
                "status": status[i],
                "ood_score": float(score[i]),
                "error": "",
                # Full precision: these are what the test log loss is computed from.
                "probabilities": json.dumps([float(v) for v in probs[i]]),
                "scores": json.dumps({m: float(v[where[i]]) for m, v in every.items()}),
            })
        return pd.DataFrame(rows, columns=columns)
