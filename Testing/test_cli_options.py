"""One ``sam3d`` argparse root: the option table agrees across sub-commands, unknown arguments are refused
with exit status 2, failures map to exit statuses in one place, and an existing output is refused unless
``--overwrite`` (every command)."""
from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from SAM3DSegmentLib import cli
from SAM3DSegmentLib.cli import demo, diagnose, download, evaluate, runner, segment, serve, train

REPO = Path(__file__).resolve().parents[1]

#: Flags that several commands take with a meaning that differs by design, and why.
DIFFERENT_MEANINGS = {"--out": "an output FILE for segment and train merge/export-encoder, an output FOLDER "
                                "for demo and evaluate (each command's help says which)"}
#: (command, flag) pairs that differ from every other command's flag by design, and why: a server offers several
#: models, so ``sam3d serve`` repeats --model and names each --checkpoint file (NAME=PATH).
OWN_MEANINGS = {("serve", "--model"): "repeatable", ("serve", "--checkpoint"): "repeatable NAME=PATH"}
#: The shared options (issue 11) and the commands that must take each of them.
ENGINE_COMMANDS = ("segment", "demo", "evaluate")
SHARED = {
    "--model": ENGINE_COMMANDS, "--checkpoint": ENGINE_COMMANDS, "--dtype": ENGINE_COMMANDS,
    "--device": ENGINE_COMMANDS + ("train run",), "--threads": ENGINE_COMMANDS + ("train run",),
    "--spacing": ENGINE_COMMANDS, "--clamp-hu": ENGINE_COMMANDS, "--prompt-mode": ENGINE_COMMANDS,
    "--no-extend": ENGINE_COMMANDS, "--max-regions": ENGINE_COMMANDS, "--quiet": ENGINE_COMMANDS,
    "--overwrite": ENGINE_COMMANDS + ("train run", "train merge", "train export-encoder", "train make-demo-data"),
}


def _parsers(parser, prefix=""):
    """``{command path: parser}`` for every (nested) sub-command: "segment", ..., "train run", ..."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                name = f"{prefix} {sub_name}".strip()
                out[name] = sub
                out.update(_parsers(sub, name))
    return out


def _options(parser):
    """``{flag: action}`` for every optional argument (long and short spellings)."""
    return {s: a for a in parser._actions for s in a.option_strings if not isinstance(a, argparse._HelpAction)}


def _signature(action):
    return (type(action).__name__, action.dest, action.default, tuple(action.choices or ()), action.help,
            getattr(action.type, "__name__", action.type), action.nargs, action.required, action.metavar,
            tuple(action.option_strings))


def test_every_flag_has_one_spelling_default_choices_and_help_across_commands():
    parsers = _parsers(cli.build_parser())
    assert set(parsers) >= {"segment", "demo", "evaluate", "train", "train run", "train merge",
                            "train export-encoder", "train make-demo-data", "download", "diagnose"}
    table = {}
    for name, p in parsers.items():
        for flag, action in _options(p).items():
            if (name, flag) not in OWN_MEANINGS:
                table.setdefault(flag, {})[name] = _signature(action)
    checked = 0
    for flag, by_command in table.items():
        if len(by_command) < 2 or flag in DIFFERENT_MEANINGS or flag in ("-o",):
            continue
        assert len(set(by_command.values())) == 1, f"{flag} differs between {sorted(by_command)}: {by_command}"
        checked += 1
    assert checked >= len(SHARED)
    # -o is --out wherever it exists
    assert {table["-o"][n][1] for n in table["-o"]} == {"out"}
    for flag, commands in SHARED.items():
        missing = [c for c in commands if c not in table.get(flag, {})]
        assert not missing, f"{flag} missing from {missing}"
    # the one default of the CT clamp is no clamp, as the library's Session and the Slicer module
    from SAM3DSegmentLib.inference.session import SessionOptions

    assert {sig[2] for sig in table["--clamp-hu"].values()} == {None} == {SessionOptions().clamp_hu}
    assert inspect.signature(demo.run_demo).parameters["clamp_hu"].default is None


def test_each_command_alone_has_the_same_options_as_under_the_root():
    sub = _parsers(cli.build_parser())
    for module in cli.COMMANDS.values():
        alone = {f: _signature(a) for f, a in _options(runner.command_parser(module)).items()}
        assert alone == {f: _signature(a) for f, a in _options(sub[module.NAME]).items()}, module.NAME


EVERY_COMMAND = [
    ["segment", "--out", "m.nii.gz"], ["auto", "--out", "i.seg.nrrd"], ["demo"],
    ["evaluate", "--sample", "chest", "--out", "o"],
    ["train", "c.json"], ["train", "merge", "p.pt", "-o", "x.pt"], ["train", "export-encoder", "c.pt", "-o", "x.pt"],
    ["train", "make-demo-data", "d"], ["download"], ["diagnose"], ["serve"]]


def test_the_unknown_argument_test_covers_every_command():
    assert set(cli.COMMANDS) <= {argv[0] for argv in EVERY_COMMAND}


@pytest.mark.parametrize("argv", EVERY_COMMAND)
def test_unknown_arguments_are_refused_with_status_2_before_anything_runs(argv, capsys, monkeypatch):
    for module in cli.COMMANDS.values():
        monkeypatch.setattr(module, "run", lambda args: pytest.fail("ran despite an unknown argument"))
    assert cli.main(argv + ["--no-such-option"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unrecognized arguments: --no-such-option" in err[0], err
    assert err[0].startswith(f"sam3d {argv[0]}: error:")
    # abbreviations are not guessed either
    assert cli.main(["diagnose", "--ver"]) == 2


def test_failures_map_to_exit_statuses_in_one_place(capsys):
    from SAM3DSegmentLib.core.geometry import GeometryError
    from SAM3DSegmentLib.inference.backends import BackendError
    from SAM3DSegmentLib.io import VolumeReadError
    from SAM3DSegmentLib.models.checkpoint_file import CheckpointError
    from SAM3DSegmentLib.weights import WeightsError

    def raising(err):
        def run(args):
            raise err
        return run

    cases = [(cli.UsageError("bad flag"), 2), (cli.CliError("bad data"), 1), (GeometryError("outside"), 1),
             (CheckpointError("not a checkpoint"), 1), (VolumeReadError("unreadable"), 1),
             (WeightsError("offline\n  how to continue"), 1), (OSError(28, "No space left on device"), 1),
             (BackendError("no model", ["choose one:", "--model demo"]), 1), (KeyboardInterrupt(), 130),
             (ImportError("no module named torch"), 1), (TypeError("a bug"), 1)]
    for err, status in cases:
        assert runner.execute("segment", raising(err), None) == status, err
        lines = capsys.readouterr().err.splitlines()
        assert lines[0].startswith("sam3d segment: error: "), lines
        assert len(lines) == 1 + len(getattr(err, "details", ())), lines
    assert runner.execute("segment", raising(TypeError("a bug")), None) == 1
    assert "unexpected TypeError: a bug" in capsys.readouterr().err
    assert runner.execute("segment", raising(ImportError("x")), None) == 1
    assert "'segment' command is not available" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ overwrite
def _refused(argv, capsys, *precious):
    before = {p: p.read_bytes() for p in precious}
    assert cli.main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and "already" in err[0], err
    assert {p: p.read_bytes() for p in precious} == before


def test_segment_refuses_an_existing_mask_or_timings_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("SAM3DSegmentLib.inference.backends.load_backend",
                        lambda *a, **k: pytest.fail("loaded a model for a refused run"))
    mask, timings = tmp_path / "m.nii.gz", tmp_path / "t.json"
    mask.write_bytes(b"earlier mask")
    args = ["segment", "--sample", "chest", "--voxel", "--click", "40,64,17", "--model", "demo"]
    _refused(args + ["--out", mask], capsys, mask)
    timings.write_bytes(b"earlier timings")
    _refused(args + ["--out", tmp_path / "new.nii.gz", "--timings", timings], capsys, mask, timings)
    assert sorted(os.listdir(tmp_path)) == ["m.nii.gz", "t.json"]


def test_demo_refuses_a_folder_holding_earlier_results(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("SAM3DSegmentLib.inference.backends.load_backend",
                        lambda *a, **k: pytest.fail("loaded a model for a refused run"))
    (tmp_path / "demo.json").write_text("{}")
    _refused(["demo", "--out", tmp_path], capsys, tmp_path / "demo.json")


def test_train_refuses_to_start_over_an_earlier_run_and_to_replace_files(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    from _train_fixtures import tiny_config, write_config

    import SAM3DSegmentLib.train.loop as loop

    monkeypatch.setattr(loop, "train", lambda cfg: pytest.fail("trained over an earlier run"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "final.pt").write_bytes(b"earlier model")
    cfg = write_config(str(tmp_path / "c.json"), tiny_config(str(tmp_path / "data"), str(run_dir)))
    _refused(["train", cfg], capsys, run_dir / "final.pt")
    earlier = tmp_path / "x.pt"
    earlier.write_bytes(b"earlier file")
    _refused(["train", "merge", tmp_path / "partial.pt", "-o", earlier], capsys, earlier)
    _refused(["train", "export-encoder", tmp_path / "c.pt", "-o", earlier], capsys, earlier)
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.json").write_text("{}")
    _refused(["train", "make-demo-data", data], capsys, data / "dataset.json")
    # --resume continues the earlier run: not refused (training itself is stubbed here)
    monkeypatch.setattr(loop, "train", lambda cfg: None)
    assert cli.main(["train", cfg, "--resume", "auto"]) == 0


def test_module_entry_points_share_the_root(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "SAM3DSegmentLib.train", "--help"], capture_output=True,
                       text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0 and "usage: sam3d train" in r.stdout and "make-demo-data" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "SAM3DSegmentLib", "diagnose", "--bogus"], capture_output=True,
                       text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("sam3d diagnose: error: unrecognized arguments: --bogus")


def test_library_packages_do_not_import_the_cli():
    import test_architecture as arch

    graph = arch._graph()
    importers = sorted(m for m, targets in graph.items()
                       if not m.startswith("SAM3DSegmentLib.cli") and not m.endswith("__main__")
                       and any(t == "SAM3DSegmentLib.cli" or t.startswith("SAM3DSegmentLib.cli.") for t in targets))
    assert importers == [], importers
    # and no sub-command module imports a name from the root package (the old cli <-> demo circle): only
    # its sibling modules (`from . import options`, `from .runner import ...`)
    import ast

    siblings = {p.stem for p in (REPO / "SAM3DSegmentLib" / "cli").glob("*.py")}
    for module in (demo, diagnose, download, evaluate, segment, serve, train):
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        from_root = [a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     and node.level == 1 and node.module is None for a in node.names if a.name not in siblings]
        assert from_root == [], (module.__name__, from_root)


def test_quiet_means_nothing_but_errors_in_evaluate_too(tmp_path, capsys, monkeypatch):
    import types

    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"stub")
    stub = types.SimpleNamespace(name="stub backend", image_size=64)
    monkeypatch.setattr("SAM3DSegmentLib.inference.backends.load_backend",
                        lambda *a, **k: (stub, {"checkpoint": str(ckpt), "backend": stub.name, "device": "cpu"}))
    per = [{"click": 1, "dice_mean": 0.5}]
    summary = {"protocols": {"engine": {"label": "engine", "per_target": {"ball": per}, "per_click": per}}}
    monkeypatch.setattr("SAM3DSegmentLib.eval.evaluate.run_evaluation", lambda *a, **k: summary)
    argv = ["evaluate", "--sample", "chest", "--checkpoint", str(ckpt), "--protocol", "engine"]
    assert cli.main(argv + ["--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr()
    assert "Dice@1" in out.out and "stub backend" in out.err
    assert cli.main(argv + ["--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("command", ["segment", "demo", "evaluate"])
def test_honour_clicks_is_on_unless_the_engine_option_turns_it_off(command):
    """--no-honour-clicks (issue 8 item 6) is one engine option, spelled the same in every command."""
    base = {"segment": ["segment", "x.nii.gz", "--click", "1,2,3", "--out", "m.nii.gz"], "demo": ["demo"],
            "evaluate": ["evaluate", "--sample", "chest", "--out", "o"]}[command]
    parser = cli.build_parser()
    assert parser.parse_args(base).honour_clicks is True
    assert parser.parse_args(base + ["--no-honour-clicks"]).honour_clicks is False
