"""``galore-kernels bench``: every benchmark runs and prints its table (tiny --smoke sizes, or --quick with
the smoke sizes swapped in), the user's mistakes end in one line, exit status 2, and bench/'s
pytest-benchmark rows time the tables' own cases with the tables' clock."""

import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from galore_kernels.benchmarks import data_parallel, gpu, layerwise, refresh, sharded_refresh, step
from galore_kernels.benchmarks.harness import ShapeSweep, synchronized_clock
from galore_kernels.cli import main
from galore_kernels.cli.bench import NAMES, selected

BENCH = Path(__file__).resolve().parent.parent / "bench"

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
ENVIRONMENT = re.compile(
    r"^\d{4}-\d\d-\d\d \| .+, \d+ threads \| galore_kernels \S+, torch \S+, triton \S+, galore-torch \S+, "
    r"bitsandbytes \S+, transformers \S+, python \d+\.\d+\.\d+$",
    re.M,
)


def _tables(capsys, argv: list[str]) -> str:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert ENVIRONMENT.search(out), out
    return out


def _rows(out: str, prefix: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(prefix)]


def test_refresh_quick(capsys, monkeypatch):
    monkeypatch.setitem(refresh.SIZES, "quick", refresh.SIZES["smoke"])
    out = _tables(capsys, ["bench", "--only", "refresh", "--quick", "--device", "cpu"])
    assert "`galore-kernels bench --only refresh --device cpu --quick`" in out
    assert "| shape | rank | exact ms | randomized ms | speed-up | energy captured (randomized / exact) |" in out
    (row,) = _rows(out, "| 96×160 |")
    assert re.fullmatch(r"\| 96×160 \| 16 \| \d+ \| \d+ \| \d+\.\d× \| 0\.99\d\d \|", row), row


def test_step_smoke(capsys):
    out = _tables(capsys, ["bench", "--only", "step", "--smoke", "--device", "cpu"])
    steady, refreshing = _rows(out, "| 96×160 |")
    assert re.fullmatch(r"\| 96×160 \| 16 \| steady \| \d+\.\d \| \d+\.\d \| \d+\.\d\d× \|", steady), steady
    assert "| refresh |" in refreshing


def test_step_without_galore_torch_says_not_installed(capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "galore_torch", None)  # import galore_torch now fails
    out = _tables(capsys, ["bench", "--only", "step", "--smoke", "--device", "cpu"])
    for row in _rows(out, "| 96×160 |"):
        assert re.fullmatch(r"\| 96×160 \| 16 \| \w+ \| not installed \| \d+\.\d \| not installed \|", row), row


def test_layerwise_smoke(capsys):
    out = _tables(capsys, ["bench", "--only", "layerwise", "--smoke", "--device", "cpu"])
    assert "4 × Linear(64, 64) fp32, GaLoreAdamW8bit r=8 T=2, accumulation k=2" in out
    rows = {row.split(" | ")[0][2:]: row for row in _rows(out, "| plain") + _rows(out, "| layer-wise")}
    assert list(rows) == list(layerwise.MODES)
    assert "| 4.0 grads |" in rows["plain"]  # every layer's gradient alive at once without layer-wise mode


def test_data_parallel_smoke_counts_what_each_mode_all_reduces(capsys):
    out = _tables(capsys, ["bench", "--only", "data_parallel", "--smoke", "--device", "cpu"])
    assert "2 × Linear(64, 64) fp32, GaLoreAdamW8bit r=8" in out
    assert "2 processes (gloo, 127.0.0.1, 1 thread each)" in out
    modes = ("| plain", "| low-rank", "| layer-wise")
    rows = {row.split(" | ")[0][2:]: row for prefix in modes for row in _rows(out, prefix)}
    assert list(rows) == list(data_parallel.MODES)
    # Two 64 × 64 weights: plain DDP sends 8,192 elements every step; the hook sends S (8 × 64 each)
    # between refreshes and the full gradients on the refresh step; layer-wise data parallel sends what
    # the hook does plus one presence element per weight.
    assert "| 8,192 | 0.0 | 8,192 |" in rows["plain DDP"]
    assert "| 1,024 | 0.0 | 8,192 |" in rows["low-rank hook"]
    assert "| 1,026 | 0.0 | 8,194 |" in rows["layer-wise"]


def test_sharded_refresh_smoke_measures_what_crosses_and_what_is_held(capsys):
    out = _tables(capsys, ["bench", "--only", "sharded_refresh", "--smoke", "--device", "cpu"])
    rows = {row.split(" | ")[1]: row for row in _rows(out, "| 64×160")}
    assert list(rows) == list(sharded_refresh.METHODS)
    # 64 × 160 left-projected at r = 8 (w = 16), sliced into 2 × 80 columns. The sketch all-reduces
    # 64 × 16 fp32 three times, two 16 × 16 and one 32 × 32 fp64 Grams (24,576 bytes) and holds at most
    # its own 64 × 80 slice (20,480 bytes); the gather's owner receives both slices and holds all of G
    # (40,960 bytes) and then broadcasts B (2,048 bytes).
    assert "| 0.02 | 0.02 | 1.00000 |" in rows["sketch"]
    assert "| 0.04 | 0.04 | 1.00000 |" in rows["gather"]
    assert "| 0.00 | 0.04 | 1.00000 |" in rows["one process"]


def test_data_parallel_on_one_gpu_says_two_are_needed(capsys, monkeypatch):
    """The CUDA run needs 2 GPUs (NCCL, one per process): with one it prints why and runs nothing."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "one test GPU")
    settings = data_parallel.SIZES["smoke"]
    assert list(data_parallel.measure(settings, "cuda")) == []
    data_parallel.print_table(data_parallel.measure(settings, "cuda"), settings, "cuda")
    environment_line, reason = capsys.readouterr().out.splitlines()
    assert environment_line.split(" | ")[1].startswith("one test GPU")
    assert reason == (
        "skipped: the CUDA run needs 2 GPUs (NCCL, one GPU per process; NCCL does not run 2 ranks on one GPU "
        "reliably), 1 visible"
    )
    assert data_parallel.missing_gpus("cpu") is None


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="checks a machine with fewer than 2 GPUs")
def test_nccl_needs_a_gpu_per_process():
    from galore_kernels.distributed.launch import init_nccl

    with pytest.raises(RuntimeError, match=f"NCCL with 2 processes needs 2 GPUs, {torch.cuda.device_count()} visible"):
        init_nccl(0, 2, port=0)  # refused before any process group exists


def test_gpu_smoke(capsys):
    """The GPU table on tiny shapes: under Triton's interpreter without a GPU."""
    out = _tables(capsys, ["bench", "--only", "gpu", "--smoke", "--device", DEVICE])
    assert "| shape | rank | weights | row | µs | GB/s | TFLOP/s | × roofline floor |" in out
    assert "| shape | rank | refresh | ms | energy (÷ exact top-r) |" in out
    assert "| 96×160 | 16 | bfloat16 | ours fused kernels (8-bit moments) |" in out
    assert "| 96×160 | 16 | ours randomized (Triton sketch) |" in out


def test_repeats_reach_the_settings(capsys, monkeypatch):
    seen = []

    def measure(settings, device):
        seen.append((settings, device))
        yield refresh.Row(8, 8, 2, 2.0, 1.0, 1.0)

    monkeypatch.setattr(refresh, "measure", measure)
    out = _tables(capsys, ["bench", "--only", "refresh", "--device", "cpu", "--repeats", "7"])
    assert seen == [(ShapeSweep(refresh.SIZES["full"].shapes, 7), "cpu")]
    assert "--repeats 7`" in out and "| 8×8 | 2 | 2 | 1 | 2.0× | 1.0000 |" in out


def test_default_selection():
    assert selected(None, "cpu", smoke=False) == ["refresh", "step", "layerwise", "data_parallel", "sharded_refresh"]
    assert selected(None, "cuda", smoke=False) == ["gpu", "layerwise", "data_parallel"]
    assert selected(None, "cpu", smoke=True) == list(NAMES)
    assert selected("layerwise, refresh", "cuda", smoke=False) == ["refresh", "layerwise"]


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    return captured.err


@pytest.mark.skipif(HAS_CUDA, reason="checks the machine without CUDA")
def test_device_cuda_without_cuda(capsys):
    err = _one_line_error(capsys, ["bench", "--device", "cuda"])
    assert err.startswith("galore-kernels bench: error: --device cuda: no CUDA device available")


@pytest.mark.parametrize("only", ["nonsense", "refresh,nonsense", ","])
def test_only_unknown_names(capsys, only):
    err = _one_line_error(capsys, ["bench", "--only", only])
    assert "choose from gpu, refresh, step, layerwise" in err


def test_gpu_on_cpu_needs_smoke(capsys):
    err = _one_line_error(capsys, ["bench", "--only", "gpu", "--device", "cpu"])
    assert "--smoke" in err


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--repeats", "x"], ["--quick", "--smoke"], ["--device", "tpu"]])
def test_bad_arguments_are_usage_errors(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_every_benchmark_has_the_cli_interface():
    for module in (gpu, refresh, step, layerwise, data_parallel):
        assert set(module.SIZES) == {"full", "quick", "smoke"}
        assert callable(module.measure) and callable(module.print_table) and module.TITLE


def _load(path: Path):
    """Import a file of bench/ (not a package) as a fresh module."""
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parametrized_cases(bench_module) -> list:
    """The cases that the test functions of a bench/ file are parametrized with."""
    return [
        case
        for test in vars(bench_module).values()
        for mark in getattr(test, "pytestmark", [])
        if mark.name == "parametrize"
        for case in mark.args[1]
    ]


CASE_FUNCTIONS = {"refresh": (refresh, "cases"), "step": (step, "cases"), "gpu": (gpu, "step_cases")}


def _spy_on_case_functions(monkeypatch) -> tuple[list, list]:
    """Replace each benchmark's case function by one returning the same cases, each recorded, and with a
    prepare that records the case's name: (cases made, names prepared)."""
    made, prepared = [], []

    def recording(case):
        def prepare(gradient):
            prepared.append(case.name)
            return case.prepare(gradient)

        return case._replace(prepare=prepare)

    def spy(real):
        def cases(*args, **kwargs):
            built = [recording(case) for case in real(*args, **kwargs)]
            made.extend(built)
            return built

        return cases

    for module, function in CASE_FUNCTIONS.values():
        monkeypatch.setattr(module, function, spy(getattr(module, function)))
    return made, prepared


def test_pytest_benchmark_rows_are_the_tables_cases(monkeypatch):
    """Every row of bench/ is parametrized with a case that a table's case function returned: a row built
    any other way is not among them."""
    made, _ = _spy_on_case_functions(monkeypatch)
    rows = [case for path in sorted(BENCH.glob("test_bench_*.py")) for case in _parametrized_cases(_load(path))]
    assert {"refresh 1024x2816 r=128", "steady step 1024x2816 r=128", "step 4096x11008 r=512 bfloat16"} <= {
        row.group for row in rows
    }
    assert [row for row in rows if not any(row is case for case in made)] == []


@pytest.mark.parametrize("name", CASE_FUNCTIONS)
def test_tables_time_the_case_functions_cases(capsys, monkeypatch, name):
    """The table prepares (and so times) each case its case function returns, once, in order."""
    made, prepared = _spy_on_case_functions(monkeypatch)
    _tables(capsys, ["bench", "--only", name, "--smoke", "--device", DEVICE])
    assert prepared and prepared == [case.name for case in made]


def test_pytest_benchmark_rows_use_the_harness_clock():
    """bench/conftest.py sets pytest-benchmark's timer option to a name that resolves to the clock of
    seconds_per_call."""
    load_timer = pytest.importorskip("pytest_benchmark.utils").load_timer
    conftest = _load(BENCH / "conftest.py")
    config = SimpleNamespace(option=SimpleNamespace())
    conftest.pytest_configure(config)
    assert load_timer(config.option.benchmark_timer).target is synchronized_clock
