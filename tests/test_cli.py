"""The `cvr` entry point as a user meets it: both demos end to end at a tiny size, and bad input."""
import os
import re

from engine.cli import main


def test_the_video_demo_indexes_files_with_the_shipped_checkpoint_and_shows_moments(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out, "--videos", "30", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "0 changed, 0 unchanged, 0 removed, 0 skipped" in printed
    rows = [line for line in printed.splitlines() if re.match(r"\| \d+ \| video\d+ \|", line)]
    assert rows and all(".mp4 |" in row and ".jpg |" in row for row in rows)
    assert all(re.search(r"\| \d+(\.\d+)?-\d+(\.\d+)? \(", row) for row in rows)  # the matching segment
    assert printed.count("anchor: ") == 4 and "demo wall time:" in printed and "(write mp4" in printed
    for row in rows:  # every path and thumbnail printed is there
        path, thumbnail = (cell.strip() for cell in row.split("|")[4:7:2])
        assert os.path.isfile(path) and os.path.isfile(thumbnail)


def test_the_training_demo_runs_end_to_end_at_a_tiny_size(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--train", "--out", out, "--videos", "8", "--epochs", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "== 1. the built-in data set ==" in printed
    for row in ("| text-only |", "| full |", "| chance |", "| rank | video id | score |", "anchor: ",
                "latency per query (ms, cold", "demo wall time:", "text-only model (waited"):
        assert row in printed, row
    for checkpoint in ("text_only", "full"):
        assert os.path.exists(os.path.join(out, checkpoint, "model.safetensors"))
    assert os.path.exists(os.path.join(out, "anchors_student4", "anchor_meta.json"))
    assert "best validation criterion" in open(os.path.join(out, "text_only.log")).read()  # the background log
    # A second run reuses the data set instead of drawing it again.
    assert main(["demo", "--train", "--out", out, "--videos", "8", "--epochs", "1", "--quiet"]) == 0
    assert "reusing" in capsys.readouterr().out


def test_unknown_command_and_missing_arguments_exit_non_zero(capsys):

    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cvr: error: argument command: invalid choice") and err.count("\n") == 1
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert "required" in err and err.count("\n") == 1 and "cvr train --help" in err
    assert main(["--help"]) == 0 and "usage: cvr" in capsys.readouterr().out


def test_train_on_missing_collection_is_one_line(tmp_path, capsys):
    code = main(["train", "--root", str(tmp_path), "--collection", "nothing", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "nothing" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "c")


def test_a_missing_extra_is_named_with_its_install_command():
    import pytest

    from engine.cli.common import CLIError, require

    with pytest.raises(CLIError, match=r"needs no_such_module_xyz: pip install 'cvr-sdgm\[train\]'"):
        require("train", "json", "no_such_module_xyz")
    require("train", "json")  # installed: nothing to say
