"""The CLI without a server: one-line errors (never a traceback), --version, help on every option,
config discovery from the working directory, and the simulator's progress bar."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from genserve.bench.live import free_port
from genserve.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]


def gs(*args, cwd=None, env=None, timeout=120):
    e = {k: v for k, v in os.environ.items() if k != "GENSERVE_CONFIG"}
    e.update({"PYTHONPATH": str(ROOT / "src"), **(env or {})})
    return subprocess.run([sys.executable, "-m", "genserve.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=e, timeout=timeout)


def one_line_error(p, code=None):
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("genserve")]
    assert len(lines) == 1, p.stderr
    if code is not None:
        assert p.returncode == code, (p.returncode, p.stderr)
    return lines[0]


def test_version():
    p = gs("--version")
    assert p.returncode == 0 and p.stdout.startswith("genserve ")


@pytest.mark.parametrize("args, needle", [
    (["submit", "a cat", "--size", "64"], "'64' is not WIDTHxHEIGHT"),
    (["submit", "a cat", "--size", "0x64"], "must be positive"),
])
def test_bad_size_is_a_usage_error(args, needle):
    p = gs(*args)
    assert p.returncode == 2 and needle in one_line_error(p)


def test_server_down_is_one_line():
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["submit", "a cat"], ["jobs"], ["cancel", "x"], ["result", "x"], ["models"]):
        args = args + ["--url", url]
        line = one_line_error(gs(*args), 3)
        assert f"cannot connect to {url}/" in line and "genserve serve" in line, args


def test_missing_and_broken_files():
    line = one_line_error(gs("bench", "--compare", "missing.json", "other.json"), 2)
    assert line == "genserve: missing.json: No such file or directory"
    line = one_line_error(gs("models", "--config", "/nonexistent/genserve.toml"), 2)
    assert "/nonexistent/genserve.toml: cannot read config file" in line


def test_bench_compare_not_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    assert "bad.json: not a JSON result file" in one_line_error(gs("bench", "--compare", str(bad), str(bad)), 2)


def test_config_discovered_in_working_directory_and_all_errors_listed(tmp_path):
    (tmp_path / "genserve.toml").write_text('[server]\nprot = 1\n[models.a]\nkind = "image"\nsource = "x"\n'
                                            'max_batch_siz = 2\n')
    p = gs("models", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "invalid config (2 errors)" in p.stderr
    assert "server.prot: unknown key; did you mean 'port'?" in p.stderr
    assert "models.a.max_batch_siz: unknown key; did you mean 'max_batch_size'?" in p.stderr
    (tmp_path / "genserve.toml").write_text('[models.mine]\nkind = "image"\nsource = "x"\n')
    p = gs("models", "--json", cwd=tmp_path, env={"GENSERVE_MODELS__MINE__MAX_BATCH_SIZE": "7"})
    assert p.returncode == 0, p.stderr
    assert '"id": "mine"' in p.stdout and '"max_batch_size": 7' in p.stdout
    # $GENSERVE_CONFIG is used when there is no ./genserve.toml
    other = tmp_path / "sub"
    other.mkdir()
    p = gs("config", "check", cwd=other, env={"GENSERVE_CONFIG": str(tmp_path / "genserve.toml")})
    assert p.returncode == 0 and "ok (1 models)" in p.stdout


def _parsers(p: argparse.ArgumentParser, path=("genserve",)):
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _parsers(sp, path + (name,))


def test_every_option_has_help_and_every_command_a_description():
    seen = 0
    for path, p in _parsers(build_parser()):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                assert all(c.help for c in a._choices_actions), path
                continue
            assert a.help, f"{' '.join(path)} {a.option_strings or a.dest}: no help text"
        assert p.description or len(path) == 1, path
        seen += 1
    assert seen >= 12
    for cmd in ("serve", "submit", "jobs", "cancel", "result", "bench", "models", "config", "simulate", "keys",
                "trace"):
        p = gs(cmd, "--help")
        assert p.returncode == 0 and "example" in p.stdout, cmd


def test_simulate_shows_progress(tmp_path):
    p = gs("simulate", str(ROOT / "benchmarks" / "sim_1m.toml"), "--requests", "3000")
    assert p.returncode == 0, p.stderr
    assert "sim s" in p.stderr and "requests=" in p.stderr
    q = gs("simulate", str(ROOT / "benchmarks" / "sim_1m.toml"), "--requests", "3000", "-q")
    assert "sim s" not in q.stderr


def test_trace_export_finds_the_job_store_through_the_discovered_config(tmp_path):
    """`genserve trace export` reads the data directory of ./genserve.toml's server (or --data-dir)."""
    from genserve.server.jobs.jobstore import JobStore

    store = JobStore(tmp_path / "store" / "jobs.db")
    store.insert("j1", None, {"model": "m", "width": 64, "height": 64, "steps": 2, "priority": "high"}, 5.0)
    store.close()
    (tmp_path / "genserve.toml").write_text('[server]\ndata_dir = "store"\n[models.m]\nkind = "image"\nsource = "x"\n')
    p = gs("trace", "export", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert '"model": "m"' in p.stdout and '"priority": "high"' in p.stdout and "exported 1 jobs" in p.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert "exported 1 jobs" in gs("trace", "export", "--data-dir", str(tmp_path / "store"), cwd=elsewhere).stderr
    assert "no job store at genserve-data/jobs.db" in one_line_error(gs("trace", "export", cwd=elsewhere), 2)
