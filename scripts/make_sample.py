"""Developer tool: cut the demo's E2E sample (data/sample/) from the E2E dev and test sets in ../shared.

The full training set is not reachable offline, so the sample's train and validation splits are drawn from the
official *development* set, disjoint by MR; its test split is a subset of MRs of the official test set with all
their references. Deterministic (seeded), so rerunning it reproduces the shipped files byte for byte.

    python scripts/make_sample.py ../shared/e2e data/sample --train-mrs 150 --dev-mrs 20 --test-mrs 60
"""
import argparse
import csv
import random
from pathlib import Path

from stages.lib.e2e import group_by_mr, read_e2e_csv


def write(path: Path, groups) -> int:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\n")
        w.writerow(["mr", "ref"])
        n = 0
        for mr, refs in groups:
            for ref in refs:
                w.writerow([mr, ref])
                n += 1
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--train-mrs", type=int, required=True)
    ap.add_argument("--dev-mrs", type=int, required=True)
    ap.add_argument("--test-mrs", type=int, required=True)
    ap.add_argument("--seed", type=int, default=2021)
    a = ap.parse_args()
    src, out = Path(a.src), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    dev = group_by_mr(read_e2e_csv(src / "devset.csv"))
    test = group_by_mr(read_e2e_csv(src / "testset_w_refs.csv"))
    picked = rng.sample(range(len(dev)), a.train_mrs + a.dev_mrs)
    train_idx, dev_idx = sorted(picked[:a.train_mrs]), sorted(picked[a.train_mrs:])
    test_idx = sorted(rng.sample(range(len(test)), a.test_mrs))  # sorted: keep order of first appearance
    for name, groups, idx in [("trainset.csv", dev, train_idx), ("devset.csv", dev, dev_idx),
                              ("testset_w_refs.csv", test, test_idx)]:
        n = write(out / name, [groups[i] for i in idx])
        print(f"{out / name}: {len(idx)} MRs, {n} rows")


if __name__ == "__main__":
    main()
