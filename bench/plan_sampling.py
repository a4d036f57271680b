"""aten ops and host time per ``sample_plan`` call (mim and mapet, batch 64, ViT-B grid).

    PYTHONPATH=$PWD python bench/plan_sampling.py [--before OLD_objectives.py]

``--before`` also measures another version of mapet_ds/models/objectives.py, e.g.
``git show 0edea7e:mapet_ds/models/objectives.py > /tmp/before.py`` (the device sampler).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time

import torch
from torch.profiler import profile

from mapet_ds.models import objectives


def measure(mod, kind: str, batch: int = 64, calls: int = 30) -> dict:
    m = 75 if kind == "mim" else 98
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        mod.sample_plan(kind, batch, 14, m, generator=g)
    with profile() as prof:
        mod.sample_plan(kind, batch, 14, m, generator=g)
    ops = sum(e.name.startswith("aten::") for e in prof.events())
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        mod.sample_plan(kind, batch, 14, m, generator=g)
        times.append(time.perf_counter() - t)
    return {"aten_ops": ops, "ms_per_plan_median": round(1e3 * statistics.median(times), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="another objectives.py to measure too")
    args = ap.parse_args()
    mods = {"after": objectives}
    if args.before:
        spec = importlib.util.spec_from_file_location("objectives_before", args.before)
        mods = {"before": importlib.util.module_from_spec(spec), **mods}
        sys.modules["objectives_before"] = mods["before"]  # dataclasses look their module up
        spec.loader.exec_module(mods["before"])
    print(json.dumps({f"{name}/{kind}": measure(mod, kind) for name, mod in mods.items() for kind in ("mim", "mapet")}))


if __name__ == "__main__":
    main()
