"""The representation evaluators against scikit-learn on the same features: scikit-learn's digits as 64 raw pixel
features (1200 to fit, 597 to score). Accuracy and wall time of jaxclf's kNN, few-shot and linear probe beside
scikit-learn's cosine NearestNeighbors (DINO's weighted votes on top) and LogisticRegression (same C).

    python bench/representations.py [--out bench/results/representations_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors

from jaxclf.evaluation import features, fewshot, knn, linear_probe


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _sklearn_knn(x, y, queries, k=20, temperature=0.07):
    distances, neighbours = NearestNeighbors(n_neighbors=k, metric="cosine").fit(x).kneighbors(queries)
    scores = np.zeros((len(queries), y.max() + 1))
    for row in range(len(queries)):
        np.add.at(scores[row], y[neighbours[row]], np.exp((1.0 - distances[row]) / temperature))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/representations_cpu.json")
    args = parser.parse_args()
    x, y = load_digits(return_X_y=True)
    x, y = x.astype(np.float32), y.astype(np.int32)
    fit_x, fit_y, test_x, test_y = x[:1200], y[:1200], x[1200:], y[1200:]
    train = features.SplitFeatures(fit_x, fit_y, 10)
    rows = {}

    ours, seconds = _timed(lambda: knn.predict_scores(train, test_x, k=20, temperature=0.07))
    theirs, their_seconds = _timed(lambda: _sklearn_knn(fit_x, fit_y, test_x))
    rows["knn k=20 T=0.07"] = {"jaxclf": float(np.mean(ours.argmax(1) == test_y)),
                               "reference": float(np.mean(theirs.argmax(1) == test_y)),
                               "max_relative_score_difference": float(np.max(np.abs(ours - theirs) / theirs.max(1, keepdims=True))),
                               "jaxclf_s": seconds, "reference_s": their_seconds}
    for c in (0.01, 0.1, 1.0):
        fitted, seconds = _timed(lambda: linear_probe.fit_standardised(fit_x, fit_y, c, 10, max_iter=1000))
        _, mean, std = fitted
        reference, their_seconds = _timed(lambda: LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit((fit_x - mean) / std, fit_y))
        rows[f"linear probe C={c}"] = {
            "jaxclf": float(np.mean(linear_probe.scores(fitted, test_x).argmax(1) == test_y)),
            "reference": float(reference.score((test_x - mean) / std, test_y)),
            "jaxclf_s": seconds, "reference_s": their_seconds}
    for shots in (1, 5, 10, 25):
        accuracies, seconds = _timed(lambda: [
            np.mean(fewshot.predict(fewshot.fit_lsr(fit_x[kept], fit_y[kept], 10, 2.0 ** 10), test_x) == test_y)
            for kept in (fewshot.sample_shots(fit_y, 10, shots, seed) for seed in range(3))])
        rows[f"fewshot {shots}-shot (3 seeds)"] = {"jaxclf": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
                                                   "jaxclf_s": seconds}

    print(f"{'method':32s} {'jaxclf':>8s} {'reference':>10s} {'jaxclf s':>9s} {'ref s':>7s}")
    for name, row in rows.items():
        reference = f"{row['reference']:10.4f}" if "reference" in row else f"{'':10s}"
        reference_s = f"{row['reference_s']:7.2f}" if "reference_s" in row else f"{'':7s}"
        print(f"{name:32s} {row['jaxclf']:8.4f} {reference} {row['jaxclf_s']:9.2f} {reference_s}")
    record = {"benchmark": "representations", "data": "sklearn digits, raw 64 pixels, 1200 fit / 597 scored",
              "platform": jax.devices()[0].platform, "loadavg": os.getloadavg(), "results": rows,
              "note": "jaxclf seconds include the first call's compile"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
