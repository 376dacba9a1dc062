"""``galore-kernels train``: a small comparison run writes its table, curves and numbers; bad input is one line."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from case_ids import named_by_inputs
from galore_kernels.cli import main
from galore_kernels.training.compare import AllReduced, RunConfig, RunResult, tiny_llama
from galore_kernels.training.corpus import CharTokenizer, make_corpus, split_tokens
from galore_kernels.training.report import table

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
        (["--nproc", "0"], "--nproc must be >= 1, got 0"),
        (["--nproc", "2", "--batch-size", "3"], "--batch-size 3 must be a multiple of --nproc 2"),
        (["--nproc", "2", "--device", "cuda"], "multi-GPU training (NCCL) is not built into train"),
        (["--nproc", "4096", "--batch-size", "4096"], "--nproc 4096: this machine has"),
    ]),
)
def test_bad_input_is_one_line(arguments, message, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), *arguments]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_nproc_that_is_not_a_number_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--nproc", "two"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--nproc: invalid int value: 'two'" in err and err.count("\n") == 1


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


@pytest.mark.slow
def test_two_processes_count_what_each_optimizer_all_reduces(tmp_path, capsys):
    """`--nproc 2` (about 20 s on 2 CPU cores): plain DDP all-reduces every gradient element at every step;
    the low-rank hook and layer-wise data parallel all of them on refresh steps only, S between them."""
    pytest.importorskip("matplotlib")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPU cores")
    names = "adamw,galore_adamw,galore_adamw_8bit_layerwise"
    assert main(["train", "--nproc", "2", "--optimizers", names, "--out", str(tmp_path), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "all-reduced/step  bytes/step" in printed and "2 processes (gloo" in printed
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["processes"] == 2
    results = {r["name"]: r for r in payload["results"]}
    assert list(results) == names.split(",")

    model = tiny_llama(RunConfig(hidden_size=32, layers=1, heads=2, seq_len=32), _vocab_size())
    gradient_elements = sum(p.numel() for p in model.parameters())
    parameters = len(list(model.parameters()))
    plain = results["adamw"]["all_reduced"]
    assert plain["via"] == "plain DDP" and plain["elements_per_step"] == [gradient_elements] * 16
    assert plain["bytes_per_element"] == 4 and plain["mean_bytes_per_step"] == 4 * gradient_elements
    refreshes = {0, 6, 12}  # -T 6: the projectors refresh at optimizer steps 0, 6 and 12
    # Layer-wise data parallel adds one presence element per parameter to every all-reduce.
    for name, extra in (("galore_adamw", 0), ("galore_adamw_8bit_layerwise", parameters)):
        counts = results[name]["all_reduced"]["elements_per_step"]
        assert [i for i, n in enumerate(counts) if n == gradient_elements + extra] == sorted(refreshes), name
        assert all(counts[i] < gradient_elements for i in range(16) if i not in refreshes), name
        assert results[name]["all_reduced"]["mean_elements_per_step"] < gradient_elements
    for r in results.values():
        assert all(math.isfinite(loss) for loss in r["train_losses"]), r["name"]
        assert r["final_validation_loss"] < r["initial_validation_loss"], r["name"]
        assert r["tokens_per_second"] > 0


def _vocab_size() -> int:
    return CharTokenizer(make_corpus(seed=0)).vocab_size


def test_the_table_shows_what_a_data_parallel_run_all_reduced():
    def result(name, all_reduced):
        return RunResult(name, 1e-3, [3.0], [(0, 4.0), (1, 3.0)], 100.0, 1024, 4096, 1.0, all_reduced)

    rows = table([result("adamw", AllReduced("plain DDP", [2048, 2048], 4)),
                  result("galore_adamw", AllReduced("DDP + low_rank_hook", [2048, 512, 512, 512], 4))], {}, "cpu")
    header, adamw, galore = rows.splitlines()
    assert header.split()[9:11] == ["all-reduced/step", "bytes/step"]
    assert adamw.split()[6:9] == ["2,048", "8.00", "KiB"]
    assert galore.split()[6:9] == ["896", "3.50", "KiB"]  # the mean: one refresh step of the full 2,048
    assert "all-reduced" not in table([result("adamw", None)], {}, "cpu")  # one process: today's columns
