"""
Settings a run must take or refuse in one line: the AUTORESEARCH_* switches (one
rule for all, read in one place), train.py's sizes (TOTAL_BATCH_SIZE, DEPTH,
ASPECT_RATIO, HEAD_DIM), a CPU's out-of-memory, Ctrl-C, FlexAttention forced on
a CPU, and `prepare.py --help` answering before torch loads. CPU only.

    uv run pytest tests/test_settings.py                 # the fast ones, ~20 s
    uv run pytest tests/test_settings.py -m slow         # smoke runs of train.py, ~2 minutes on 2 cores
"""

import os
import re
import signal
import subprocess
import sys

import pytest

from helpers import ROOT, run_edited

import train
from autoresearch import attention, environment, gpu, guards

# =============================================================================
# AUTORESEARCH_* switches: one rule, one parser
# =============================================================================

SWITCHES = ["AUTORESEARCH_SMOKE", "AUTORESEARCH_FUSED", "AUTORESEARCH_ATTENTION", "AUTORESEARCH_BASE_URL",
            "AUTORESEARCH_BACKOFF", "AUTORESEARCH_CACHE"]
PROBE = ("import constants; from autoresearch import attention, download, kernels, paths; "
         "print(constants.SMOKE, kernels.fused_kernels()[0], attention.select_attention('cpu').split()[0], "
         "download.BASE_URL, download.BACKOFF_BASE, paths.CACHE_DIR)")


def probe(**values):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(values)
    return subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_every_switch_reads_empty_and_blank_as_unset():
    unset = probe()
    assert unset.returncode == 0, unset.stderr
    for value in ("", "  "):
        result = probe(**dict.fromkeys(SWITCHES, value))
        assert result.returncode == 0, (value, result.stderr)
        assert result.stdout == unset.stdout, value


@pytest.mark.parametrize("parse, words", [
    (lambda: environment.switch("AUTORESEARCH_X", False), {"1": True, " TRUE ": True, "Yes": True, "on": True,
                                                           "0": False, "False": False, " no": False, "OFF": False,
                                                           "": False, "  ": False}),
    (lambda: environment.switch("AUTORESEARCH_X", True), {"off": False, "": True, "true": True}),
    (lambda: environment.choice("AUTORESEARCH_X", ("auto", "sdpa"), "auto"), {" SDPA ": "sdpa", "": "auto"}),
    (lambda: environment.number("AUTORESEARCH_X", 2.0), {"0.5": 0.5, " 3 ": 3.0, "": 2.0}),
    (lambda: environment.text("AUTORESEARCH_X", "/d"), {"/x": "/x", " ": "/d", "": "/d"}),
])
def test_the_one_rule_takes_the_same_words_everywhere(monkeypatch, parse, words):
    for value, expected in words.items():
        monkeypatch.setenv("AUTORESEARCH_X", value)
        assert parse() == expected, value


@pytest.mark.parametrize("parse, value, message", [
    (lambda: environment.switch("AUTORESEARCH_X", False), "maybe", "is not a yes or a no: use 1/true/yes/on"),
    (lambda: environment.choice("AUTORESEARCH_X", ("auto", "sdpa"), "auto"), "fa2", ": use auto, sdpa"),
    (lambda: environment.number("AUTORESEARCH_X", 2.0), "soon", "is not a number of at least 0"),
    (lambda: environment.number("AUTORESEARCH_X", 2.0), "-1", "is not a number of at least 0"),
])
def test_anything_else_is_one_line_naming_the_variable(monkeypatch, parse, value, message):
    monkeypatch.setenv("AUTORESEARCH_X", value)
    with pytest.raises(SystemExit, match=re.escape(f"error: AUTORESEARCH_X={value!r}") + ".*" + re.escape(message)):
        parse()


def test_every_switch_is_read_through_the_one_parser():
    """No module reads an AUTORESEARCH_* variable from the process environment but environment.py."""
    read = re.compile(r"""(environ(\.get)?\s*[\[(]|getenv\s*\()\s*f?["']AUTORESEARCH_""")
    sources = [ROOT / "constants.py", ROOT / "prepare.py", ROOT / "train.py", ROOT / "analysis.py",
               *ROOT.glob("autoresearch/*.py"), *ROOT.glob("bench/*.py")]
    offenders = [f"{path.relative_to(ROOT)}:{n}" for path in sources if path.name != "environment.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if read.search(line)]
    assert not offenders, f"read these through autoresearch/environment.py: {offenders}"

# =============================================================================
# train.py's sizes, memory, Ctrl-C, a backend that cannot train
# =============================================================================


@pytest.mark.parametrize("total", [0, -2**19, 2**19 + 0.5])
def test_a_total_batch_size_that_is_not_positive_is_one_line(total):
    with pytest.raises(SystemExit, match=r"^FAIL: TOTAL_BATCH_SIZE \(.*\) must be a multiple of .* positive"):
        guards.check_batch_size(total, 4, 256)


@pytest.mark.parametrize("depth, aspect_ratio, head_dim, named", [
    (0, 64, 128, "DEPTH=0"), (8, 0, 128, "ASPECT_RATIO=0"), (8, 64, 0, "HEAD_DIM=0"), (-2, 64, 128, "DEPTH=-2"),
    (8, 64, 64.5, "HEAD_DIM=64.5"), (8, float("nan"), 128, "ASPECT_RATIO=nan")])
def test_model_sizes_that_build_no_model_are_one_line(depth, aspect_ratio, head_dim, named):
    guards.check_model_settings(8, 64, 128)
    guards.check_model_settings(2, 40.5, 32)  # a fractional aspect ratio is fine: the width is rounded up
    with pytest.raises(SystemExit, match=rf"^FAIL: {re.escape(named)}.*must be positive"):
        guards.check_model_settings(depth, aspect_ratio, head_dim)


CPU_OOM = "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"


def test_a_cpu_out_of_memory_and_ctrl_c_are_one_line(capsys):
    assert gpu.is_out_of_memory(RuntimeError(CPU_OOM)) and gpu.is_out_of_memory(MemoryError())
    gpu._micro_batch = 1
    with pytest.raises(SystemExit) as exit_info:
        with gpu.out_of_memory_exit():
            raise RuntimeError(CPU_OOM)
    assert exit_info.value.code == 1
    assert capsys.readouterr().out.strip() == ("FAIL: CPU out of memory, even at a micro-batch of 1: the model does "
                                               "not fit this machine's memory. Lower DEPTH or ASPECT_RATIO.")
    with pytest.raises(SystemExit) as exit_info:
        with gpu.out_of_memory_exit():
            raise KeyboardInterrupt
    assert exit_info.value.code == 130
    assert capsys.readouterr().out.strip() == "FAIL: interrupted (Ctrl-C): the run stopped before its result"


def test_flex_attention_forced_on_a_cpu_is_refused_before_training(monkeypatch):
    monkeypatch.setattr(attention, "_backend", None)
    attention.select_attention("cpu", "flex")  # a forward check may still use it
    config = train.GPTConfig(sequence_len=16, n_head=2, n_kv_head=2, n_embd=16)
    with pytest.raises(SystemExit, match="^FAIL: attention: flex was asked for .* no backward on a CPU"):
        attention.prepare_attention(config, [(8, 0)], "cpu")


@pytest.mark.slow
def test_prepare_help_answers_before_torch_loads():
    for args in (["--help"], ["--num-shards", "many"]):
        result = subprocess.run([sys.executable, "-X", "importtime", "prepare.py", *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines()
                    if line.startswith("import time:")]
        assert "torch" not in imported, args
    assert result.returncode == 1 and "invalid int value: 'many'" in result.stderr

# =============================================================================
# The same, end to end: smoke runs of train.py
# =============================================================================


def fail_lines(result):
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("FAIL")]


@pytest.mark.slow
@pytest.mark.parametrize("old, new, named", [
    ("DEPTH, ASPECT_RATIO, HEAD_DIM = 2, 32, 32", "DEPTH, ASPECT_RATIO, HEAD_DIM = 2, 32, 0", "HEAD_DIM=0"),
    ("DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE = 4, 4 * MAX_SEQ_LEN", "DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE = 4, 0",
     "TOTAL_BATCH_SIZE (0)")])
def test_bad_sizes_stop_a_run_with_one_fail_line(tmp_path, prepared_cache, old, new, named):
    result = run_edited(tmp_path, prepared_cache, {"train.py": [(old, new)]})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(fail_lines(result)) == 1 and named in fail_lines(result)[0], result.stdout[-2000:]


@pytest.mark.slow
def test_a_cpu_out_of_memory_stops_a_run_with_one_fail_line(tmp_path, prepared_cache):
    result = run_edited(tmp_path, prepared_cache, {"train.py": [(
        "        x, y, epoch = next(batches)\n",
        f"        x, y, epoch = next(batches)\n        raise RuntimeError({CPU_OOM!r})\n")]})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert fail_lines(result) == ["FAIL: CPU out of memory, even at a micro-batch of 1: the model does not fit this "
                                  "machine's memory. Lower DEPTH or ASPECT_RATIO."], result.stdout[-2000:]


def smoke_env(cache, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    return {**env, "AUTORESEARCH_SMOKE": "1", "AUTORESEARCH_CACHE": str(cache), "PYTHONUNBUFFERED": "1", **extra}


@pytest.mark.slow
def test_flex_forced_on_a_cpu_stops_a_run_with_one_fail_line(prepared_cache):
    result = subprocess.run([sys.executable, "train.py"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=smoke_env(prepared_cache, AUTORESEARCH_ATTENTION="flex"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(fail_lines(result)) == 1 and "no backward on a CPU" in fail_lines(result)[0]


@pytest.mark.slow
def test_ctrl_c_stops_a_run_with_one_fail_line(prepared_cache):
    run = subprocess.Popen([sys.executable, "train.py"], cwd=ROOT, env=smoke_env(prepared_cache),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in run.stdout:  # the identity lines are out: the run is setting up or training
            if line.startswith("model:"):
                break
        run.send_signal(signal.SIGINT)
        stdout, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert fail_lines(subprocess.CompletedProcess([], 130, stdout, stderr)) == [
        "FAIL: interrupted (Ctrl-C): the run stopped before its result"]
