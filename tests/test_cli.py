"""The command line: help for every command, YAML defaults, clear errors with exit code 2."""

import subprocess
import sys

import pytest

from chatforge.commands import main as cli
from chatforge.pipeline import load_settings
from chatforge.stages import to_flags


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


@pytest.mark.parametrize("argv", [["model", "info", "--help"], ["pipeline", "--help"]])
def test_command_help_has_example(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    assert "example:" in capsys.readouterr().out


def test_unknown_preset_is_exit_2(capsys):
    assert cli.main(["model", "info", "--preset", "huge"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err


def test_yaml_sets_defaults_and_cli_overrides(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: tiny\nvocab-size: 1000\n")
    assert cli.main(["model", "info", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "1000" in out
    assert cli.main(["model", "info", "--config", str(cfg), "--preset", "small"]) == 0
    out = capsys.readouterr().out
    assert "small" in out and "tiny" not in out


def test_yaml_unknown_key_is_exit_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("presett: tiny\n")
    assert cli.main(["model", "info", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown option 'presett'" in err and "preset" in err


def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "chatforge", "model", "info", "--preset", "tiny"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tiny" in r.stdout


def test_pipeline_settings(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("pretrain:\n  preset: tiny\n  max-tokens: 1000\ntokenizer:\n  vocab_size: 512\n")
    s = load_settings(str(cfg))
    assert s["pretrain"]["preset"] == "tiny" and s["pretrain"]["max_tokens"] == 1000
    assert s["tokenizer"]["vocab_size"] == 512
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrian:\n  preset: tiny\n")
    with pytest.raises(Exception, match="unknown section 'pretrian'"):
        load_settings(str(bad))


def test_to_flags():
    assert to_flags({"vocab_size": 8, "fast": True, "slow": False, "paths": ["a", "b"]}) == [
        "--vocab-size", "8", "--fast", "--paths", "a", "b"]
