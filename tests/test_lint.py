"""The code's form, checked as CI checks it: ruff's linter (pyflakes and pycodestyle: unused names,
undefined names, lines over the project's 120 columns) and ruff's formatter, both configured in
pyproject.toml. A failure prints ruff's own report: `ruff format src tests` mends the layout,
`ruff check src tests` names what is left to mend by hand."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def ruff(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("ruff") is None:
        pytest.fail("ruff is not installed: it is in the test extra (pip install -e '.[test]')")
    return subprocess.run(["ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_linter_finds_nothing():
    done = ruff("check", "src", "tests")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_code_is_formatted():
    done = ruff("format", "--check", "src", "tests")
    assert done.returncode == 0, done.stdout + done.stderr
