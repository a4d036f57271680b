"""--print-config on every launch script: the fully resolved config as YAML, exit 0, nothing built."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO

from mapet_ds.config import config_to_dict, load_config

RECIPE = REPO / "launch/recipes/demo_pretrain.yaml"
# a data path that does not exist: printing must not read it
OVERRIDES = ["model.drop_path=0.2", "data.train_list=/nonexistent/train.txt"]


def _printed(capsys, fn, argv) -> dict:
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_pretrain_and_finetune_print_the_resolved_config(capsys, tmp_path):
    from mapet_ds.engine import finetune, pretrain

    want = config_to_dict(load_config(RECIPE, OVERRIDES))
    assert want["model"]["drop_path"] == 0.2 and want["data"]["crop_pct"] == pytest.approx(224 / 248)  # a default
    for main in (pretrain.main, finetune.main):
        assert _printed(capsys, main, ["--config", str(RECIPE), *OVERRIDES, "--print-config"]) == want
    # a recipe with _base_: the merged result
    child = tmp_path / "child.yaml"
    child.write_text(f"_base_: {RECIPE}\nmodel:\n  depth: 3\n")
    got = _printed(capsys, pretrain.main, ["--config", str(child), "--print-config"])
    assert got["model"]["depth"] == 3 and got["model"]["embed_dim"] == want["model"]["embed_dim"]
    assert not any(tmp_path.glob("runs*"))


def test_bad_config_is_one_error_line_exit_2(capsys):
    from mapet_ds.engine import pretrain

    with pytest.raises(SystemExit) as e:
        pretrain.main(["--print-config", "model.colour=1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config: unknown key 'model.colour'") and "\n" not in err


def test_any_script_built_on_job_parser_gets_it():
    from mapet_ds.engine.cli import job_parser

    ap = job_parser("a future launch script")
    ap.add_argument("--extra", default=1)
    with pytest.raises(SystemExit) as e:
        ap.parse_args(["--config", str(RECIPE), "--print-config"])
    assert e.value.code == 0
    assert ap.parse_args(["--config", str(RECIPE)]).print_config is False


def _launch(name: str):
    """Import launch/<name>.py (a script, not a package) in-process: no interpreter start-up per script."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_evaluate_export_compare_tokens_demo_print_config(tmp_path, capsys):
    from mapet_ds import demo
    from mapet_ds.engine import evaluate

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(load_config(RECIPE, OVERRIDES))))
    want = config_to_dict(load_config(RECIPE, OVERRIDES))
    # the run's config.yaml when --config is not given; nothing else is read (there is no checkpoint)
    assert _printed(capsys, evaluate.main, [str(run), "--print-config"]) == want
    assert _printed(capsys, _launch("export").main, [str(run), str(tmp_path / "o.pth"), "--print-config"]) == want
    assert _printed(capsys, _launch("compare").main, ["--config", str(RECIPE), *OVERRIDES, "--print-config"]) == want
    assert not (tmp_path / "o.pth").exists()
    _launch("tokens").main(["fit", "--filelist", "x.txt", "--out", "c.pt", "--print-config"])
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["command"] == "fit" and out["kmeans_seed"] == 1234 and out["k"] == 8192
    assert demo.main(["--out", str(tmp_path / "demo"), "--print-config"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert docs[0]["pretrain"]["output_dir"].endswith("pretrain_mapet")
    assert docs[-1]["finetune"]["init"].endswith("pretrain_mapet")
    assert not (tmp_path / "demo").exists()
