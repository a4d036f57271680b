"""Config layer: defaults, overrides, round trip, and one-line rejections."""

import pytest

from mapet_ds.config import ConfigError, RunConfig, load_config, save_config


def test_defaults_resolve_sizes():
    cfg = load_config(None, ["model.size=small"])
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads) == (384, 12, 6)
    assert cfg.model.grid == 14 and cfg.objective.num_predicted(196) == 147
    assert load_config(None, ["model.size=large"]).model.depth == 24


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  size: tiny\n  drop_path: 0.1\nobjective:\n  name: pet\n")
    cfg = load_config(p, ["model.drop_path=0.2", "optim.betas=[0.9, 0.95]", "objective.name=mim"])
    assert cfg.model.drop_path == 0.2 and cfg.optim.betas == (0.9, 0.95) and cfg.objective.name == "mim"


def test_round_trip(tmp_path):
    cfg = load_config(None, ["model.size=tiny", "model.img_size=96", "tokenizer.kind=pixel_kmeans",
                             "tokenizer.vocab_size=512", "pretrain.max_steps=7", "finetune.ema_decay=0.999"])
    out = save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(out)
    assert again == cfg
    assert save_config(again, tmp_path / "again.yaml").read_text() == out.read_text()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.depth=abc"], "model.depth='abc'"),
        (["model.embed_dim=-4"], "model.embed_dim=-4: Input should be greater than 0"),
        (["model.embed_dim=100", "model.num_heads=3"], "embed_dim=100 is not divisible by num_heads=3"),
        (["model.img_size=225"], "img_size=225 is not divisible by patch_size=16"),
        (["objective.predicted_ratio=1.0"], "objective.predicted_ratio=1.0: Input should be less than 1"),
        (["objective.predicted_ratio=0"], "objective.predicted_ratio=0: Input should be greater than 0"),
        (["tokenizer.vocab_size=40000"], "tokenizer.vocab_size=40000: must be <= 32767: token stores hold int16 ids"),
        (["model.colour=red"], "unknown key 'model.colour' in section 'model' (allowed: size, embed_dim"),
        (["modle.size=tiny"], "unknown key 'modle' (allowed: model, tokenizer"),
        (["objective.name=bert"], "objective.name='bert': must be one of 'mapet', 'pet' or 'mim'"),
        (["objective.name=mim", "objective.mask_patches=196"], "objective.mask_patches=196 must be < the 196 patches"),
        (["model.size=huge"], "model.size='huge': must be one of 'tiny', 'small', 'base' or 'large'"),
        (["optim.betas=[0.9, 1.5]"], "optim.betas=[0.9, 1.5]: betas must be in [0, 1)"),
        (["model.size=null", "model.depth=4"], "set model.size or all of embed_dim/depth/num_heads (missing: embed_dim, num_heads)"),
        (["data.random_resized_crop=true"], "data.random_resized_crop=true with the offline tokenizer.kind='kclip': "
         "its token store holds the tokens of the centre-square view, so a random crop would train every patch on "
         "another patch's target; set data.random_resized_crop=false, or tokenize online (tokenizer.online=true, or vqkd/dvae)"),
    ],
)
def test_rejections_are_one_line_and_name_the_field(overrides, expected):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    msg = str(exc.value)
    assert expected in msg
    assert "\n" not in msg


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected 'section.key=value'"):
        load_config(None, ["model.size"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml:.*not valid YAML"):
        load_config(bad)


def test_runconfig_is_typed():
    cfg = RunConfig()
    assert cfg.objective.name == "mapet" and cfg.optim.clip_grad == 3.0


def test_random_crop_needs_online_tokens():
    """The demo recipe (offline pixel k-means store) refuses a random crop; vqkd/dvae keep it."""
    with pytest.raises(ConfigError, match=r"offline tokenizer.kind='pixel_kmeans'"):
        load_config("launch/recipes/demo_pretrain.yaml", ["data.random_resized_crop=true"])
    for kind in ("vqkd", "dvae"):
        assert load_config(None, ["data.random_resized_crop=true", f"tokenizer.kind={kind}"]).data.random_resized_crop
