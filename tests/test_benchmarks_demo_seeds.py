"""benchmarks/demo_seeds.py --compare: paired differences over the seeds both runs share."""
import importlib.util
import math
from pathlib import Path

import numpy as np

spec = importlib.util.spec_from_file_location("demo_seeds", Path(__file__).parents[1] / "benchmarks" / "demo_seeds.py")
demo_seeds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo_seeds)


def _result(code, rows):
    runs = [{"seed": s, **dict(zip(demo_seeds.KEYS, own)), "heldout": dict(zip(demo_seeds.KEYS, extra))}
            for s, own, extra in rows]
    return {"code": code, "heldout_sets": 8, "runs": runs}


def test_compare_pairs_seeds_and_gives_the_standard_error_of_the_mean_difference():
    rng = np.random.default_rng(0)
    old_rows = [(s, rng.uniform(40, 70, 4), rng.uniform(40, 70, 4)) for s in (0, 1, 2, 3)]
    new_rows = [(s, rng.uniform(40, 70, 4), rng.uniform(40, 70, 4)) for s in (3, 1, 0, 2, 9)]  # other order, extra seed
    table = demo_seeds.compare(_result("old", old_rows), _result("new", new_rows))
    assert table.splitlines()[0].startswith("seeds 0,1,2,3:")
    new_by_seed = {s: (own, extra) for s, own, extra in new_rows}
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line.split("|")[-2].strip()
            for line in table.splitlines()[3:]}
    for block, label in ((0, "demo's own test split"), (1, "8 more test splits")):
        for i, key in enumerate(demo_seeds.KEYS):  # the naive reference: numpy over the shared seeds
            d = np.array([new_by_seed[s][block][i] - (own, extra)[block][i] for s, own, extra in old_rows])
            assert rows[(key, label)] == f"{d.mean():+.1f} ± {d.std(ddof=1) / math.sqrt(len(d)):.1f}"
    assert len(rows) == 8
