"""ui.settings: the settings both WebUI adapters register (plain data, no Gradio needed)."""

from __future__ import annotations

from pathlib import Path

from lora_trainer.config import PRESETS
from lora_trainer.ui.settings import SETTINGS, defaults, get_setting, parse_paths, with_defaults


def test_settings_are_data_with_prefixed_keys():
    keys = [s.key for s in SETTINGS]
    assert len(keys) == len(set(keys))
    assert all(k.startswith("lora_trainer_") for k in keys)
    assert {"lora_trainer_output_subdir", "lora_trainer_tagger_cache", "lora_trainer_default_preset",
            "lora_trainer_extra_roots"} <= set(keys)
    for s in SETTINGS:
        assert s.kind in ("text", "dropdown", "textbox-list") and s.label
        if s.kind == "dropdown":
            assert s.default in s.choices
    preset = next(s for s in SETTINGS if s.key == "lora_trainer_default_preset")
    assert set(preset.choices) == set(PRESETS)


def test_with_defaults_and_paths():
    merged = with_defaults({"lora_trainer_output_subdir": "mine", "lora_trainer_tagger_cache": None})
    assert merged["lora_trainer_output_subdir"] == "mine"
    assert merged["lora_trainer_tagger_cache"] == defaults()["lora_trainer_tagger_cache"]
    assert parse_paths("/a, /b\n~/c\n") == [Path("/a"), Path("/b"), Path("~/c").expanduser()]
    assert parse_paths("") == []


def test_get_setting_reads_a_live_view():
    class LiveOpts(dict):  # like the adapters' view of shared.opts: read through on every access
        def get(self, key, default=None):
            return self.now.get(key, default)

    opts = LiveOpts()
    opts.now = {}
    assert get_setting(opts, "lora_trainer_output_subdir") == ""
    opts.now = {"lora_trainer_output_subdir": "trained"}
    assert get_setting(opts, "lora_trainer_output_subdir") == "trained"
    assert get_setting(None, "lora_trainer_default_preset") == "sd15"
