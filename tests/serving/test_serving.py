"""A real `mlflow models serve` of the registered model, answering images over HTTP."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_ports

from imgclf.metrics import decided


def post(url: str, payload) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.mark.slow
def test_served_model_answers_images_and_refuses_garbage(trained_project):
    port = free_ports()[0]
    bin_dir = str(Path(sys.executable).parent)  # mlflow execs uvicorn from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{trained_project / 'mlflow.db'}",
           "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    mlflow_exe = str(Path(bin_dir) / "mlflow")
    server = subprocess.Popen(
        [mlflow_exe, "models", "serve", "-m", "models:/imgclf/1", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=trained_project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("server did not start")
        image = next((trained_project / "data/raw/gamma").iterdir()).read_bytes()
        encoded = base64.b64encode(image).decode()
        status, body = post(f"{base}/invocations", {"dataframe_records": [{"image": encoded}]})
        assert status == 200, body
        prediction = body["predictions"][0]
        assert prediction["label"] in {"alpha", "beta", "gamma"}
        assert 0 < prediction["confidence"] <= 1
        assert len(json.loads(prediction["top_k"])) == 3

        garbage = base64.b64encode(b"definitely not a picture").decode()
        for bad in ({"dataframe_records": [{"image": garbage}]},
                    {"dataframe_records": [{"picture": encoded}]},
                    b"{not json"):
            status, body = post(f"{base}/invocations", bad)
            assert 400 <= status < 500, (bad, status, body)
            assert "Traceback" not in json.dumps(body)
            assert body.get("message")
        status, _ = post(f"{base}/invocations", {"dataframe_records": [{"image": encoded}]})
        assert status == 200  # still serving after the bad requests
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_registered_model_serves_the_fastest_copy_that_agrees(trained_project):
    import keras
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from imgclf.data.images import load_pixels

    uri = f"sqlite:///{trained_project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(client.get_model_version("imgclf", "1").run_id)
    agreements = {name.removeprefix("serving_top1_agreement."): value
                  for name, value in run.data.metrics.items()
                  if name.startswith("serving_top1_agreement.")}
    registered = json.loads((trained_project / "reports/register.json").read_text())
    candidates = json.loads((trained_project / "reports/package.json").read_text())["candidates"]
    assert set(candidates) == {"tflite_dynamic", "openvino", "openvino_int8"}
    speeds = [c["images_per_s"] for c in candidates.values()]
    assert speeds == sorted(speeds, reverse=True)  # timed by package, listed fastest first
    # Checked fastest first, both gates (the answers and the features), until one agrees.
    outcomes = [c["agrees"] for c in candidates.values()]
    first = outcomes.index(True) if True in outcomes else len(outcomes)
    assert outcomes == [False] * first + [True] * (first < len(outcomes)) + [None] * (
        len(outcomes) - first - 1)
    for fmt, candidate in candidates.items():
        if candidate["agrees"] is None:
            assert candidate["checked_images"] == 0 and fmt not in agreements
        else:
            assert candidate["agrees"] == (candidate["top1_agreement"] >= 0.98
                                           and candidate["features_min_cosine"] >= 0.999)
            assert agreements[fmt] == candidate["top1_agreement"]
    chosen = list(candidates)[first] if first < len(outcomes) else "keras"
    assert registered["serving_speeds"] == (
        {f: c["images_per_s"] for f, c in candidates.items()} if chosen != "keras" else {})
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model("models:/imgclf/1")
    inner = served.unwrap_python_model()
    assert inner.format == registered["serving_format"] == chosen
    # The model card says which format serves and why.
    card = client.get_model_version("imgclf", "1").description
    assert f"Computes with `{chosen}`" in card
    assert ("images/s on the machine that ran package" in card) == (chosen != "keras")
    agreement = agreements.get(chosen, 1.0)

    # The check ran on these validation images: answers agree as often as it measured.
    val = pd.read_csv(trained_project / "data/prepared/val.csv")
    files = [trained_project / p for p in val["path"]]
    out = served.predict(pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode()
                                                 for f in files]}))
    model = keras.models.load_model(trained_project / "models/model.keras", safe_mode=True)
    probs = model.predict(np.stack([load_pixels(str(f), 75, "crop") for f in files])
                          .astype("float32"), verbose=0)
    classes = json.loads((trained_project / "data/prepared/classes.json").read_text())
    same = np.array([label == classes[i] for label, i in zip(out["label"], probs.argmax(1),
                                                              strict=True)])
    counted = decided(probs)  # close calls may flip under round-off: the gate skips them
    assert (same[counted].mean() if counted.any() else 1.0) == pytest.approx(agreement,
                                                                           abs=1e-6)
    np.testing.assert_allclose(out["confidence"], probs.max(1), atol=0.05)


def test_served_tta_averages_each_image_with_its_mirror(trained_project):
    # `evaluate.tta` and the served model's `tta` param: the mean of the answers for the image
    # and for its mirror image, sent as files.
    import io

    import mlflow
    import numpy as np
    import pandas as pd
    from PIL import Image

    files = sorted((trained_project / "data/raw/beta").glob("*.png"))[:4]

    def as_upload(img: Image.Image) -> str:
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    originals = [Image.open(f).convert("RGB") for f in files]
    mirrored = [img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for img in originals]
    mlflow.set_tracking_uri(f"sqlite:///{trained_project / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model("models:/imgclf/1")

    def probs(uploads, **params):
        out = served.predict(pd.DataFrame({"image": uploads}),
                             params={"probabilities": True, **params})
        return np.array([json.loads(p) for p in out["probabilities"]])

    plain = probs([as_upload(i) for i in originals])
    flipped = probs([as_upload(i) for i in mirrored])
    tta = probs([as_upload(i) for i in originals], tta=True)
    np.testing.assert_allclose(tta, (plain + flipped) / 2, atol=1e-5)
    assert not np.allclose(plain, flipped, atol=1e-5)  # the mirror is a different input
