"""``galore-kernels train``: a small comparison run writes its table, curves and numbers; bad input is one line."""

import json
import os
import re
import subprocess
import sys

import pytest

from case_ids import named_by_inputs
from galore_kernels.cli import main
from galore_kernels.training.corpus import CharTokenizer, make_corpus, split_tokens

SMALL = ["--steps", "16", "--hidden-size", "32", "--layers", "1", "--heads", "2", "--seq-len", "32",
         "--batch-size", "4", "--rank", "4", "-T", "6", "--no-progress"]


def test_corpus_is_deterministic_and_round_trips():
    text = make_corpus(20_000, seed=3)
    assert text == make_corpus(20_000, seed=3) != make_corpus(20_000, seed=4)
    tokenizer = CharTokenizer(text)
    tokens = tokenizer.encode(text)
    assert tokenizer.decode(tokens) == text and tokens.max() < tokenizer.vocab_size <= 64
    splits = split_tokens(tokens)
    assert len(splits.train) + len(splits.validation) == len(tokens)


def test_train_writes_the_table_the_curves_and_the_numbers(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    names = "adamw,galore_adamw,galore_adamw_8bit_layerwise"
    assert main(["train", "--optimizers", names, "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    for label in ("AdamW", "GaLoreAdamW", "GaLoreAdamW8bit layer-wise", "tokens/s", "opt. state"):
        assert label in printed
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "GaLoreAdamW" in (out / "results.txt").read_text()
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["name"] for r in results] == names.split(",")
    for r in results:
        assert len(r["train_losses"]) == 16
        assert r["final_validation_loss"] < r["initial_validation_loss"], r["name"]
        assert r["optimizer_state_bytes"] > 0 and r["peak_bytes"] > r["optimizer_state_bytes"]
    peak = {r["name"]: r["peak_bytes"] for r in results}
    assert peak["galore_adamw_8bit_layerwise"] < peak["galore_adamw"] < peak["adamw"]  # one gradient alive at a time
    state = {r["name"]: r["optimizer_state_bytes"] for r in results}
    # (At this size every moment is below min_8bit_size=4096 elements, so 8-bit GaLore keeps fp32 moments.)
    assert state["galore_adamw_8bit_layerwise"] <= state["galore_adamw"] < state["adamw"]


@pytest.mark.parametrize(
    "arguments, message",
    named_by_inputs([
        (["--rank", "0"], "--rank must be >= 1, got 0"),
        (["--optimizers", "adamw,sgd"], "unknown optimizer sgd; choose from adamw, adamw8bit"),
        (["--lr", "adamw=fast"], "expected NAME=NUMBER"),
        (["--lr", "lion=1e-3"], "unknown optimizer 'lion'"),
        (["--hidden-size", "30", "--heads", "4"], "even multiple of --heads"),
        (["--scale", "-1"], "--scale must be a finite number > 0"),
        (["--scale", "inf"], "--scale must be a finite number > 0"),
        (["--lr", "adamw=inf"], "must be a finite number > 0"),
        (["--seed", "-1"], "--seed must be in [0, 2^32)"),
        (["--seq-len", "100000"], "must be below the validation text's 40,008 characters"),
        (["--rank", "0", "--traceback"], "--rank must be >= 1"),  # --traceback after the subcommand is accepted
    ]),
)
def test_bad_input_is_one_line(arguments, message, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), *arguments]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_unwritable_output_folder_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train", "--out", str(blocker / "run"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "cannot write to the output folder" in err and err.count("\n") == 1


def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["train", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_help_and_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "galore_kernels", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("train", "memory", "bench"):
        assert command in result.stdout
    result = subprocess.run([sys.executable, "-m", "galore_kernels", "train", "--rank"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_failing_or_missing_optimizer_keeps_the_other_runs(tmp_path, capsys, monkeypatch):
    from galore_kernels.training import compare

    real = compare.make_optimizer

    def make_optimizer(name, model, settings):
        if name == "galore_adamw":
            raise RuntimeError("boom")
        return real(name, model, settings)

    monkeypatch.setattr(compare, "make_optimizer", make_optimizer)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails: "not installed"
    assert main(["train", "--optimizers", "adamw,adamw8bit,galore_adamw", "--out", str(tmp_path), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "bnb AdamW8bit                 not run: bitsandbytes is not installed" in printed
    assert "GaLoreAdamW                   not run: failed: RuntimeError: boom" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in results["results"]] == ["adamw"] and len(results["skipped"]) == 2

    assert main(["train", "--optimizers", "adamw8bit", "--out", str(tmp_path / "none"), *SMALL]) == 1
    assert not (tmp_path / "none" / "loss_curves.png").exists()


def test_lr_of_an_optimizer_not_selected_is_refused(tmp_path, capsys):
    arguments = ["--optimizers", "adamw", "--lr", "galore_adamw=1e-2", "--steps", "1", *SMALL[2:]]
    assert main(["train", "--out", str(tmp_path), *arguments]) == 2
    err = capsys.readouterr().err
    assert "galore_adamw is not selected; --optimizers selects adamw" in err and err.count("\n") == 1
    assert not (tmp_path / "results.json").exists()


def test_a_repeated_optimizer_name_runs_once_in_its_first_place(tmp_path, capsys):
    arguments = ["--optimizers", "galore_adamw,adamw,galore_adamw", "--steps", "2", *SMALL[2:]]
    assert main(["train", "--out", str(tmp_path), *arguments]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["name"] for r in results] == ["galore_adamw", "adamw"]


def _refuse_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def test_one_step_has_no_nan_in_the_table_or_the_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    arguments = ["--optimizers", "adamw,galore_adamw", "--steps", "1", *SMALL[2:]]
    assert main(["train", "--out", str(tmp_path), *arguments]) == 0
    printed = capsys.readouterr().out
    rows = printed.splitlines()[3:5]  # environment, settings, column names, then one row per optimizer
    assert [row.split()[0] for row in rows] == ["AdamW", "GaLoreAdamW"]
    for row in rows:  # step 1 is not timed, so there is no tokens/s
        assert "nan" not in row.lower() and row.split()[5] == "n/a", row
    assert "nan" not in (tmp_path / "results.txt").read_text().lower()
    text = (tmp_path / "results.json").read_text()
    results = json.loads(text, parse_constant=_refuse_constant)["results"]  # NaN, Infinity would raise
    assert [r["tokens_per_second"] for r in results] == [None, None]
    assert all(len(r["train_losses"]) == 1 and r["final_train_loss"] > 0 for r in results)


def test_ctrl_c_writes_the_finished_runs_and_exits_130(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from galore_kernels.training import compare

    real = compare.run_optimizer
    calls = []

    def run_optimizer(name, *args):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(name, *args)

    monkeypatch.setattr(compare, "run_optimizer", run_optimizer)
    names = "adamw,galore_adamw,galore_adamw_8bit"
    assert main(["train", "--optimizers", names, "--out", str(tmp_path), *SMALL]) == 130
    captured = capsys.readouterr()
    assert calls == ["adamw", "galore_adamw"]  # nothing runs after Ctrl-C
    assert "galore-kernels train: interrupted during GaLoreAdamW; wrote the 1 finished run" in captured.err
    assert "Traceback" not in captured.err
    assert "GaLoreAdamW                   not run: interrupted" in captured.out
    assert "GaLoreAdamW8bit               not run: interrupted before it started" in captured.out
    assert "AdamW" in (tmp_path / "results.txt").read_text()
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["interrupted"] is True
    assert [r["name"] for r in payload["results"]] == ["adamw"]
    assert payload["skipped"] == {"galore_adamw": "interrupted", "galore_adamw_8bit": "interrupted before it started"}
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("command", ["train", "memory", "bench"])
def test_help_states_each_default_once(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per option where it fits
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    options = capsys.readouterr().out.split("\noptions:\n")[1]
    # One block per option: its line starting "  -" and the help lines indented below it.
    blocks = re.split(r"\n(?=  -)", options.strip("\n"))
    assert len(blocks) > 3
    for block in blocks:
        assert block.count("default") <= 1, block
        for empty in ("(default: None)", "(default: False)", "(default: [])"):
            assert empty not in block, block


def test_output_a_terminal_cannot_encode_is_escaped():
    env = dict(os.environ, PYTHONIOENCODING="ascii")
    result = subprocess.run([sys.executable, "-m", "galore_kernels", "train", "--help"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0 and "\\u03b1" in result.stdout and "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_default_run_learns_and_galore_stays_close_to_adamw(tmp_path, capsys):
    """README's claims for `galore-kernels train` with no arguments (about a minute on 2 CPU cores)."""
    pytest.importorskip("matplotlib")
    assert main(["train", "--out", str(tmp_path), "--no-progress"]) == 0
    results = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    expected = {"adamw", "galore_adamw", "galore_adamw_8bit", "galore_adamw_8bit_layerwise"}
    assert expected <= set(results)  # bnb AdamW8bit too where bitsandbytes is installed
    for r in results.values():
        assert r["final_validation_loss"] < 0.2 * r["initial_validation_loss"], r["name"]
    adamw = results["adamw"]["final_validation_loss"]
    for name in expected - {"adamw"}:  # measured: 6% below AdamW's
        assert abs(results[name]["final_validation_loss"] / adamw - 1) < 0.10, name
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
