"""Per-iteration accuracy of a finished or running benchmark run (`bench/engine_sets.py`):
each iteration's align step (posterior argmax, half B relabelled as reconstruct matched
it), scored on the good particles under the best class permutation, with the mean
posterior entropy, the per-class resolution and the next limit.

    python bench/iteration_accuracy.py --set cftr3_nuis_2k --tag smf1 [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from hetrefine.classification import half_b_order, posterior_entropy, relabel_half_b
from hetrefine.io import run_files

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_relion import best_permutation  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "engine_sets"


def iteration_rows(run: Path, data: Path) -> list[dict]:
    """One row per finished iteration of the run folder ``run`` on the set in ``data``."""
    labels = pd.read_csv(data / "truth.csv")["class"].to_numpy()
    k_true = int(json.loads((data / "spec.json").read_text())["n_classes"])
    rows = []
    for it in sorted(run.glob("iter_*")):
        shards = [f for f in sorted(it.glob("align/shard_*.npz")) if ".sums" not in f.name]
        if it.name == "iter_000" or not shards or not (it / "model.json").exists():
            continue
        mdl = run_files.read_model(it / "model.json")
        got = [relabel_half_b(run_files.read_assignments(f), half_b_order(mdl)) for f in shards]
        idx = np.concatenate([a["index"] for a in got])
        post = np.concatenate([a["posterior"] for a in got])
        pred, lab = post.argmax(1) + 1, labels[idx]  # the shards hold a batch, or all
        good = lab > 0
        acc = best_permutation(pred[good], lab[good], post.shape[1], k_true)[0]
        rows.append({"iteration": it.name, "n": len(idx), "accuracy": acc,
                     "entropy": posterior_entropy(post),
                     "resolution_A": mdl["resolution_A"], "limit_A": mdl["res_limit_A"]})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    base = OUT / f"{a.set}_seed{a.seed}"
    for r in iteration_rows(base / f"ours_{a.tag}", base / "data"):
        res = " / ".join(f"{x:.1f}" if x else "-" for x in r["resolution_A"])
        print(
            f"{r['iteration']}: {r['n']} particles, accuracy {100 * r['accuracy']:.1f}%, "
            f"entropy {r['entropy']:.3f}, resolution {res} A, next limit {r['limit_A']:.1f} A"
        )


if __name__ == "__main__":
    main()
