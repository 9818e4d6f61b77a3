"""README's fidelity tables are the generated ones, and a preset that drifts from its write-up fails."""

from __future__ import annotations

import pytest

from sdxl_ablate.config import fidelity


def test_readme_block_is_the_generated_one():
    assert fidelity.readme_block(fidelity.README.read_text()) == fidelity.render(), (
        "README's fidelity tables are stale: run make fidelity")


def test_a_preset_that_drifts_from_its_write_up_is_an_error():
    seed_000 = next(s for s in fidelity.SEEDS if s.file == "000")
    assert "| `lora.rank` | `lora_rank = 32` | `32` | same |" in fidelity.table(seed_000)
    with pytest.raises(fidelity.FidelityError, match=r"lora.rank=8: the write-up says 32"):
        fidelity.table(seed_000, ["lora.rank=8"])
    with pytest.raises(fidelity.FidelityError, match=r"trainer.noise_offset=0.0"):
        fidelity.verdict(
            fidelity.Row("trainer.noise_offset", "noise offset", 0.1), 0.0)


def test_every_recipe_preset_has_a_table():
    from sdxl_ablate.config.schema import CONF_DIR

    presets = {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")} - {"demo"}
    tabled = {o.split("=", 1)[1] for s in fidelity.SEEDS for o in s.overrides if o.startswith("experiment=")}
    assert tabled == presets


def test_check_exits_1_on_a_stale_readme(tmp_path, monkeypatch):
    stale = tmp_path / "README.md"
    stale.write_text(f"x\n{fidelity.BEGIN}\nold table\n{fidelity.END}\ny\n")
    monkeypatch.setattr(fidelity, "README", stale)
    assert fidelity.main(["--check"]) == 1
    assert fidelity.write(stale) is True
    assert fidelity.main(["--check"]) == 0 and stale.read_text().startswith("x\n") and stale.read_text().endswith("y\n")
