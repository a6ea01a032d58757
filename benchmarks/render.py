"""docs/performance.md from reports/bench.json: every figure on the page is read from the
measurement, so none can drift from it. `make bench` runs this after measuring;
`python -m benchmarks.render` renders the page again from the committed JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EARLIER = "every other bench"  # measured_by's entry for a file's figures of unknown bench

ROOT = Path(__file__).resolve().parents[1]
BENCH_JSON = ROOT / "reports/bench.json"
PAGE = ROOT / "docs/performance.md"

# What each headline key measures. Words only: the figures come from the JSON.
DESCRIPTIONS = {
    "frozen_phase_speedup": "phase 1 as the stages run it, each way in a fresh process: the "
    "frozen base inside `fit` every epoch / the `features` stage's one pass then train's "
    "phase 1 on the stored pooled features (the demo digits)",
    "input_pipeline_headroom": "images/s of decode + resize + augment / images/s of a phase-2 "
    "training step: above 1, the input pipeline is not the bottleneck",
    "forward_peak_fraction_299": "InceptionResNetV2's forward pass at 299 px in GFLOP/s / this "
    "machine's fp32 matmul peak, both measured in the run",
    "bf16_speedup": "a phase-2 training step under `train.precision: mixed_bfloat16` / float32",
    "xla_speedup": "the same training step with XLA (`jit_compile=True`) / without",
    "noop_repro_seconds": "`dvc repro` with nothing changed (no stage runs)",
    "export_speedup": "fastest usable export format / Keras `predict`, at batch 32 on the demo "
    "model",
    "served_environment_mb": "the environment uv builds from a TFLite-served version's own "
    "`requirements.txt`",
    "served_artifacts_mb": "what a deployment of that version downloads (its artifacts, as "
    "`mlflow models serve` and `build-docker` fetch them)",
    "serve_cold_start_seconds": "`mlflow models serve` of the registered version, process "
    "start to its first answer",
    "serve_images_per_s_batch32": "images/s through that server, 32 base64 uploads a request, "
    "decoding included",
    "served_status_cost_ratio": "the served TFLite copy's forward pass answering the "
    "probabilities alone / the same pass answering the pooled features too, with the "
    "selective scores and thresholds applied (the status per image): its cost as a factor",
    "features_forward_passes_after_5pct_more_images": "the `features` stage after 5% more "
    "images (the demo digits): image views through the base / image views it stores",
    "features_seconds_after_5pct_more_vs_full": "that stage's time / a full run on the same "
    "grown data (no stored features): its fixed part (TensorFlow, the base) is in both",
    "spark_vs_predict_images_per_s": "`imgclf spark-predict --master local[2]` / `imgclf "
    "predict`, images/s of each whole command (start-up included) on the same folder and "
    "registered version",
    "spark_session_start_seconds": "a Spark session started and stopped in a fresh process "
    "(the JVM's start-up)",
    "clone_pull_and_repro_vs_full_run": "a second clone's `dvc pull` + `dvc repro` (nothing "
    "to run) / the pipeline's run to evaluate in the first clone, same data and params",
    "finetune_stored_vs_images_val_accuracy": "validation accuracy after the fine-tune epochs: "
    "phase 2 on the stored activations at the cut / on images (whole base, fresh "
    "augmentation)",
    "finetune_epoch_speedup_stored_vs_images": "a fine-tune epoch on images / on the stored "
    "activations",
    "prepare_images_per_s": "`prepare` on generated photo-like JPEGs, each decoded whole and "
    "hashed for the near-duplicate gate",
    "prepare_near_duplicate_gate_slowdown": "the same `prepare` with the gate / without "
    "(`prepare.near_duplicate_distance: null`)",
    "prepare_peak_rss_mb": "peak memory of that `prepare` run: manifest rows and hashes, never "
    "the pixels",
    "near_duplicate_distance_default": "`prepare.near_duplicate_distance`'s default: the "
    "distance the next four rows are measured at",
    "near_duplicate_copies_found_digits": "share of resized/re-encoded copies of the demo "
    "digits grouped with their original at the default distance",
    "near_duplicate_copies_found_photos": "the same on generated photos",
    "near_duplicate_distinct_pairs_grouped_digits": "distinct digit pairs grouped at the "
    "default distance",
    "near_duplicate_distinct_pairs_grouped_photos": "distinct photo pairs grouped at the "
    "default distance",
}
# Size-suffixed keys (export_speedup_150, export_speedup_299_int8): described by their stem.
STEMS = {
    "export_speedup_{size}": "the export stage's own table at {size} px: recommended format / "
    "Keras `predict`",
    "export_speedup_{size}_int8": "full-integer int8 TFLite / Keras `predict` at {size} px "
    "(`export.tflite: [dynamic, int8]`)",
    "served_format_auto_{size}": "the format `mlflow.serving_format: auto` served at {size} "
    "px on this machine (the fastest copy that agrees, timed by package)",
    "pipeline_marginal_forward_passes_{size}": "what one more image costs the whole pipeline "
    "at {size} px (every stage through DVC, at two dataset sizes), in forward passes: the "
    "slope of the total over the slope of one Keras forward pass over the same images",
    "pipeline_fixed_seconds_{size}": "the same line at zero images: what every run at {size} "
    "px pays before its first image",
    "head_only_experiment_forward_passes_{size}": "`dvc exp run -S train.finetune_lr=...` on "
    "the larger dataset at {size} px, beyond the fixed part, in forward passes over its "
    "images (it never runs `features`)",
    "cache_mb_per_image_{size}": "`data/features/` per image at {size} px: the cut "
    "activations and pooled features",
    "experiment_cache_mb_{size}": "what that experiment added to `.dvc/cache`",
}


def describe(key: str) -> str | None:
    if key in DESCRIPTIONS:
        return DESCRIPTIONS[key]
    for stem, text in STEMS.items():
        head, _, tail = stem.partition("{size}")
        middle = key[len(head):len(key) - len(tail)] if key.startswith(head) else ""
        if key.endswith(tail) and middle.isdigit():
            return text.format(size=middle)
    return None


def _value(value) -> str:
    if isinstance(value, list):
        return " / ".join(_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 10 else f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _headline(results: dict) -> list[str]:
    lines = ["| key | value | what it measures |", "|---|---|---|"]
    for key, value in results.items():
        if isinstance(value, dict) or (isinstance(value, list) and not (
                value and all(isinstance(v, int | float) for v in value))):
            continue
        lines.append(f"| `{key}` | {_value(value)} | {describe(key) or ''} |")
    return lines


def _pipeline(results: dict) -> list[str]:
    lines = []
    for key in sorted((k for k in results if k.startswith("pipeline_") and k[9:].isdigit()),
                      key=lambda k: int(k[9:])):
        lines += _pipeline_at(results[key])
    return lines


def _pipeline_at(pipeline: dict) -> list[str]:
    small, large = pipeline["images"]
    sizes = [str(small), str(large)]
    timed, peak = _STAGE_TIMING[pipeline.get("timed_with")]
    turns = ", the sizes taking turns" if pipeline.get("sizes_interleaved") else ""
    lines = ["", f"## The pipeline's cost, stage by stage ({pipeline['image_size']} px, "
             f"{pipeline['classes']} classes, {pipeline['photo']} photos)", "",
             (timed
              + (f" (the fastest of {pipeline['runs_per_size']} runs, each in a fresh "
                 f"repository{turns})" if pipeline.get("runs_per_size", 1) > 1 else "")
              + ", its fixed part (the line through both sizes, at zero images: what the "
              f"stage costs before its first image) and its peak memory ({peak}), at each "
              "dataset size. " + _STARTS[bool(pipeline.get("warm_starts"))]), "",
             "| stage | " + " | ".join(f"{n} images: s" for n in sizes) + " | fixed s | "
             + " | ".join(f"{n} images: peak MB" for n in sizes) + " |",
             "|---|" + "---|" * (2 * len(sizes) + 1)]
    seconds = pipeline["seconds_by_stage"]
    peaks = pipeline["peak_rss_mb_by_stage"]
    for stage in seconds[sizes[0]]:
        at = [seconds[n][stage] for n in sizes]
        fixed = at[0] - (at[1] - at[0]) / (large - small) * small
        lines.append(f"| `{stage}` | " + " | ".join(_value(s) for s in at)
                     + f" | {_value(round(fixed, 1))} | "
                     + " | ".join(_value(p) for p in peaks.get(stage, [])) + " |")
    forward = pipeline["forward_pass_seconds"]
    lines += ["", "One Keras forward pass over the same images: "
              + ", ".join(f"{_value(forward[n])} s at {n}" for n in sizes)
              + f". The training-params experiment (`{pipeline['head_only_experiment_command']}`)"
              f" took {_value(pipeline['head_only_experiment_seconds'])} s and ran "
              + ", ".join(f"`{s}`" for s in pipeline["head_only_experiment_stages_run"]) + "."]
    return lines


# How the pipeline bench timed its stages (its record's `timed_with`; None: before it said):
# what a stage's seconds and its peak memory were of.
_STAGE_TIMING = {
    None: ("Seconds of each stage through `dvc repro --single-item`",
           "the DVC process and the stage"),
    "dvc repro": ("Seconds of each stage in one `dvc repro` of the whole pipeline, from its "
                  "start to the next stage's, DVC hashing and caching its outputs included",
                  "the stage's process"),
}


# How its stages started (the record's `warm_starts`; absent: before warm starts existed).
_STARTS = {
    True: ("Each run started with no warm server: the first stage started one and ran as a "
           "fresh process, every later stage in a child of it ([warm starts](pipeline.md#"
           "what-each-stage-costs)):"),
    False: "Every stage ran as a fresh process (no warm starts):",
}


def _formats(title: str, formats: dict) -> list[str]:
    lines = ["", title, "", "| format | images/s | top-1 agreement with Keras | "
             "decided top-1 agreement |", "|---|---|---|---|"]
    for name, fmt in formats.items():
        # None: the reference itself, or a copy package left unchecked (a faster one agreed)
        agreement = [("-" if name == "keras" else "not checked") if v is None else _value(v)
                     for v in (fmt.get("top1_agreement"),
                               fmt.get("decided_top1_agreement", "-"))]
        lines.append(f"| `{name}` | {_value(fmt.get('images_per_s'))} | "
                     f"{agreement[0]} | {agreement[1]} |")
    return lines


def _measured_by(results: dict) -> list[str]:
    """Which run measured each bench, where a later `--only` run refreshed some of them."""
    runs = results.get("measured_by", {})
    if len({(r["date"], r["commit"]) for r in runs.values()}) < 2:
        return []
    lines = ["", "Measured in several runs (`--only`), each bench's own:"]
    for name, r in runs.items():
        head, _, tail = name.partition(" ")
        label = name if name == EARLIER else f"`{head}`" + (f" at {tail}" if tail else "")
        isa = ", ".join(r["instruction_sets"]) or "no AVX"
        lines.append(f"- {label}: {r['cpu_model']} ({isa}), {r['date']}, "
                     f"commit `{r['commit'][:7]}`")
    return lines


def _served(size: str, served: dict) -> list[str]:
    checked = (f"{served['test_images']} test images" if not any(
        "checked_on" in f for f in served["formats"].values()) else
        "the images each copy was checked on (`package`'s validation sample for its copies, "
        "export's test sample for the TFLite variants it converts)")
    lines = ["", f"## Served formats at {size} px (the demo digits, trained)", "",
             f"Each format / Keras `predict` at batch {served['batch_size']}, timed side by side "
             f"in one run (the export stage's table, `export.measure`); agreement with Keras on "
             f"{checked}, and on those that are no close call. "
             f"`mlflow.serving_format: auto` served `{served['auto']['chose']}` on this "
             "machine.", "",
             "| format | images/s | / Keras `predict` | top-1 agreement | decided top-1 "
             "agreement | computes in |", "|---|---|---|---|---|---|"]
    for name, fmt in served["formats"].items():
        lines.append(f"| `{name}` | {_value(fmt['images_per_s'])} | "
                     f"{_value(fmt['speedup_vs_keras_predict'])} | "
                     f"{_value(fmt['top1_agreement'])} | "
                     f"{_value(fmt.get('decided_top1_agreement') or '-')} | "
                     f"{fmt.get('precision') or '-'} |")
    return lines


def _near_duplicates(results: dict) -> list[str]:
    table = results.get("near_duplicates", {}).get("by_max_distance")
    if not table:
        return []
    lines = ["", "## The near-duplicate gate by distance", "",
             "| set | max distance | resized copies found | cropped copies found | "
             "distinct pairs grouped (across labels) |", "|---|---|---|---|---|"]
    for name, rows in table.items():
        for distance, row in rows.items():
            lines.append(f"| {name} | {distance} | {_value(row['resized_copies_found'])} | "
                         f"{_value(row['cropped_copies_found'])} | "
                         f"{row['distinct_pairs_grouped']} "
                         f"({row['distinct_pairs_grouped_across_labels']}) |")
    return lines


def render(results: dict) -> str:
    machine = results.get("machine", {})
    isa = ", ".join(machine.get("instruction_sets", [])) or "not recorded"
    lines = [
        "# Performance",
        "",
        "<!-- Generated by `make bench` (benchmarks/render.py) from reports/bench.json: "
        "edit those, not this page. -->",
        "",
        f"Last run on **{machine.get('cpu_model', machine.get('processor', 'unknown'))}**, "
        f"{machine.get('cpus', '?')} cores, instruction sets {isa}; Python "
        f"{machine.get('python', '?')}; {machine.get('date', 'date not recorded')}"
        + (f", commit `{machine['commit'][:7]}`" if machine.get("commit") else "") + ".",
        *_measured_by(results),
        "",
        "`make bench` measures each comparison both ways in one run, on the same data and "
        "seed, and reports ratios: absolute times on shared machines are noise, and machines "
        "differ (the same work can take three times longer on an AVX2-only CPU than on one "
        "with AVX-512). Sizes are flags (`.venv/bin/python -m benchmarks.run --help`); "
        "`--only NAME` refreshes some measurements and keeps the others.",
        "",
        *_headline(results),
        *_pipeline(results),
    ]
    if "export" in results:
        lines += _formats(f"## Export formats on the demo model "
                          f"({results['export']['image_size']} px)",
                          results["export"]["formats"])
    for key in sorted(k for k in results if k.startswith("export_") and k[7:].isdigit()):
        lines += _formats(f"## Export formats at {key[7:]} px (random init: the decided "
                          "agreement counts only the images that are no close call)",
                          results[key]["formats"])
    for key in sorted(k for k in results if k.startswith("served_formats_")):
        lines += _served(key.removeprefix("served_formats_"), results[key])
    lines += _near_duplicates(results)
    lines += ["", "## What the numbers decide", "", *DECISIONS]
    return "\n".join(lines) + "\n"


DECISIONS = [
    "- **Stored features** (`features.cache: true`, default): `frozen_phase_speedup` and "
    "`finetune_epoch_speedup_stored_vs_images` are why phase 1 and phase 2 train on the "
    "`features` stage's arrays; `finetune_stored_vs_images_val_accuracy` is what it costs in "
    "accuracy without fresh augmentation. On a dataset that needs augmentation, try "
    "`dvc exp run -S features.views=4` or `-S features.cache=false` and compare.",
    "- **Precision** stays `float32` by default: `bf16_speedup` is above 1 only on CPUs with "
    "AVX-512 BF16 (emulated and slower elsewhere), and its cost in accuracy varies. The saved "
    "model is rebuilt in float32 either way, so every machine serves the same answers.",
    "- **XLA** stays off on CPUs (Keras's own default, on with a GPU) while `xla_speedup` is "
    "not above 1.",
    "- **Decoding** is not cached or pre-resized while `input_pipeline_headroom` is well above "
    "1; **threads** keep TensorFlow's defaults while `forward_peak_fraction_299` is near 1.",
    "- **Serving** (`mlflow.serving_format: auto`) uses the fastest copy on the machine that "
    "packages it of those that keep 98% top-1 agreement: the served-formats table shows why "
    "this is measured, not fixed (which format wins moves with the CPU and the image size); "
    "`serve_images_per_s_batch32` is what serving buys, `served_environment_mb` the "
    "environment it needs.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=str(BENCH_JSON))
    parser.add_argument("--output", default=str(PAGE))
    args = parser.parse_args()
    results = json.loads(Path(args.input).read_text(encoding="utf-8"))
    Path(args.output).write_text(render(results), encoding="utf-8")
    print(f"render: {args.output} from {args.input}")


if __name__ == "__main__":
    main()
