"""Golden losses: tiny fixed-seed runs through the real engine must repeat exactly.

tests/golden/regenerate.py runs pre-training (mapet, pet, mim) and one fine-tuning from
the mapet run on 1 CPU rank (DeepSpeed ZeRO-2, fp32, DALI CPU) and writes their per-step
metrics; this test reruns it into a temporary folder and compares every number bitwise
with tests/golden/*.json. A change that alters numerics must show up as a diff of those
files: regenerate them with ``python tests/golden/regenerate.py`` only when the change is
meant to (README, "Tests and benchmarks").
"""

import json
import math

import pytest
from conftest import REPO, run_py

GOLDEN = REPO / "tests/golden"
RUNS = ("pretrain_mapet", "pretrain_pet", "pretrain_mim", "finetune_from_mapet")
REGEN = "python tests/golden/regenerate.py"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden")
    run_py([GOLDEN / "regenerate.py", "--out", out], cwd=REPO)
    return {name: json.loads((out / f"{name}.json").read_text()) for name in RUNS}


def _where(golden: dict, now: dict) -> str:
    """First difference, named by run step and metric."""
    g, n = golden["steps"], now["steps"]
    if [r["step"] for r in g] != [r["step"] for r in n]:
        return f"logged steps {[r['step'] for r in n]} instead of {[r['step'] for r in g]}"
    for a, b in zip(g, n):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return f"step {a['step']} {key}: {b.get(key)!r} now, {a.get(key)!r} in the golden file"
    for key in sorted(set(golden.get("final_eval", {})) | set(now.get("final_eval", {}))):
        if golden["final_eval"].get(key) != now["final_eval"].get(key):
            return f"final eval {key}: {now['final_eval'].get(key)!r} now, {golden['final_eval'].get(key)!r} golden"
    return "overrides or layout differ"


@pytest.mark.parametrize("name", RUNS)
def test_losses_equal_golden(fresh, name):
    golden = json.loads((GOLDEN / f"{name}.json").read_text())
    now = fresh[name]
    assert golden["steps"] and all(math.isfinite(r["loss"]) for r in golden["steps"])
    same = {k: golden.get(k) for k in ("overrides", "steps", "final_eval")} == \
        {k: now.get(k) for k in ("overrides", "steps", "final_eval")}
    if not same:
        env = "" if golden["made_with"] == now["made_with"] else \
            f" (the golden file was made with {golden['made_with']}, this run has {now['made_with']})"
        pytest.fail(f"golden run {name} differs: {_where(golden, now)}{env}. If this change is meant to alter "
                    f"numerics, regenerate with `{REGEN}` and commit the diff of tests/golden/*.json; otherwise "
                    f"it is a regression.", pytrace=False)


def test_golden_files_cover_every_objective_and_the_finetune():
    recs = {n: json.loads((GOLDEN / f"{n}.json").read_text()) for n in RUNS}
    for obj in ("mapet", "pet", "mim"):
        r = recs[f"pretrain_{obj}"]
        assert f"objective.name={obj}" in r["overrides"]
        assert [s["step"] for s in r["steps"]] == [1, 2, 3, 4] and all("acc" in s for s in r["steps"])
    ft = recs["finetune_from_mapet"]
    assert "finetune.init=runs/pretrain_mapet" in ft["overrides"] and len(ft["steps"]) == 3
    # three objectives, three different curves (the objective really changes the numbers)
    assert len({tuple(s["loss"] for s in recs[f"pretrain_{o}"]["steps"]) for o in ("mapet", "pet", "mim")}) == 3
