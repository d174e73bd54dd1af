"""The click protocols under their own names everywhere (issue 15): ``newest-click`` (SAM-Med3D's training and
published evaluation) and ``all-clicks`` (its inference code, validate_paired_img_gt), with the older spellings
``newest`` / ``all`` accepted as aliases by the engine, every ``sam3d`` command and the training config."""
from __future__ import annotations

import json

import pytest

from SAM3DSegmentLib.cli import demo, evaluate, segment
from SAM3DSegmentLib.cli.options import UsageError
from SAM3DSegmentLib.cli.runner import command_parser
from SAM3DSegmentLib.core.click_protocols import (CLICK_PROTOCOL_ALIASES, CLICK_PROTOCOLS, click_protocol,
                                                  new_spelling)
from SAM3DSegmentLib.inference.options import PROMPT_MODES, SessionOptions
from SAM3DSegmentLib.train.config import ConfigError, apply_overrides, config_from_dict

NEW = ("newest-click", "all-clicks")


def test_names_say_what_each_protocol_feeds_and_old_spellings_map_onto_them():
    assert tuple(CLICK_PROTOCOLS) == NEW == PROMPT_MODES
    assert "newest click" in CLICK_PROTOCOLS["newest-click"] and "training" in CLICK_PROTOCOLS["newest-click"]
    assert "all clicks so far" in CLICK_PROTOCOLS["all-clicks"]
    assert "validate_paired_img_gt" in CLICK_PROTOCOLS["all-clicks"]
    assert "reference" not in CLICK_PROTOCOLS["newest-click"]  # the reference's inference feeds all clicks
    assert CLICK_PROTOCOL_ALIASES == {"newest": "newest-click", "all": "all-clicks"}
    assert [click_protocol(n) for n in ("newest", "all", *NEW)] == ["newest-click", "all-clicks", *NEW]
    assert new_spelling("latest") == "latest" and new_spelling(3) == 3  # left for the caller's check
    with pytest.raises(ValueError, match=r"--prompt-mode must be one of newest-click, all-clicks \(older "
                                         r"spellings: newest, all\), got 'latest'"):
        click_protocol("latest", "--prompt-mode")


def test_evaluation_configs_store_the_new_name():
    from SAM3DSegmentLib.eval.protocols import EvalConfig
    from SAM3DSegmentLib.eval.segfm import SegFMConfig

    for cls in (EvalConfig, SegFMConfig):
        assert cls().prompt_mode == "newest-click"
        assert cls(prompt_mode="all").prompt_mode == "all-clicks"
        with pytest.raises(ValueError, match="--prompt-mode must be one of newest-click, all-clicks"):
            cls(prompt_mode="reference")


def test_session_options_store_the_new_name():
    assert SessionOptions().prompt_mode == "newest-click"
    assert SessionOptions(prompt_mode="newest").prompt_mode == "newest-click"
    assert SessionOptions(prompt_mode="all").prompt_mode == "all-clicks"
    assert SessionOptions(prompt_mode="all-clicks").prompt_mode == "all-clicks"
    with pytest.raises(ValueError, match="prompt_mode must be one of newest-click, all-clicks"):
        SessionOptions(prompt_mode="reference")


@pytest.mark.parametrize("command", [segment, demo, evaluate])
def test_every_engine_command_takes_the_names_and_the_aliases(command):
    parser = command_parser(command)
    base = {segment: ["--sample", "chest", "--click", "1,2,3", "--out", "m.nii.gz"],
            demo: ["--out", "d"], evaluate: ["--sample", "chest", "--out", "e"]}[command]
    assert parser.parse_args(base).prompt_mode == "newest-click"
    for given, stored in (("all", "all-clicks"), ("newest", "newest-click"), ("all-clicks", "all-clicks")):
        assert parser.parse_args(base + ["--prompt-mode", given]).prompt_mode == stored
    with pytest.raises(UsageError, match="argument --prompt-mode: the click protocol must be one of "
                                         "newest-click, all-clicks"):
        parser.parse_args(base + ["--prompt-mode", "reference"])
    help_text = parser.format_help()
    assert "{newest-click,all-clicks}" in help_text and "older spellings newest and all" in " ".join(help_text.split())


def test_training_feed_takes_the_names_and_the_aliases():
    assert config_from_dict({}).loop.feed == "newest-click"
    assert config_from_dict({"loop": {"feed": "all"}}).loop.feed == "all-clicks"
    assert apply_overrides(config_from_dict({}), ["loop.feed=all-clicks"]).loop.feed == "all-clicks"
    assert apply_overrides(config_from_dict({}), ["loop.feed=newest"]).loop.feed == "newest-click"
    with pytest.raises(ConfigError, match="loop.feed"):
        config_from_dict({"loop": {"feed": "every"}})


def test_bundled_training_configs_use_the_new_names():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))
    assert configs
    for path in configs:
        feed = json.loads(path.read_text()).get("loop", {}).get("feed")
        assert feed in (None, *NEW), (path.name, feed)
        config_from_dict(json.loads(path.read_text()))
