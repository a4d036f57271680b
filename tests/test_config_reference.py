"""Every config field has a one-line description, and mapet_ds/docs/CONFIG.md is the current reference."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

from mapet_ds.config import REFERENCE_COMMAND, RunConfig, config_reference


def test_every_field_has_a_one_line_description():
    missing = []
    for section, info in RunConfig.model_fields.items():
        assert info.description, section
        for name, f in info.annotation.model_fields.items():
            if not f.description or "\n" in f.description:
                missing.append(f"{section}.{name}")
    assert not missing, f"add Field(..., description='one line') to: {', '.join(missing)}"


def test_config_md_is_current():
    want = config_reference()
    have = (REPO / "mapet_ds" / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    assert have == want, f"mapet_ds/docs/CONFIG.md is out of date: regenerate it with `{REFERENCE_COMMAND}`"
    rows = [line for line in want.splitlines() if line.startswith("| `")]
    n = sum(len(info.annotation.model_fields) for info in RunConfig.model_fields.values())
    assert len(rows) == n
    assert "| `optim.decay_mask_token` | bool | `true` |" in want
    assert "| `data.crop_pct` | float | `0.903226` |" in want


def test_module_prints_the_reference():
    out = subprocess.run([sys.executable, "-m", "mapet_ds.config", "--reference"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out == config_reference()
