"""Package hygiene: one Lightning package, and an entry point that imports nothing heavy until it trains."""

import re
import subprocess
import sys

from conftest import ROOT

SOURCES = ["lightning_ft/**/*.py", "tests/*.py", "benchmarks/*.py"]


def test_only_pytorch_lightning_is_imported():
    # `lightning` and `pytorch_lightning` are two copies of the same code; mixing them gives TypeErrors.
    pattern = re.compile(r"^\s*(import|from) lightning\b", re.M)  # \b: `lightning_ft` does not match
    offenders = [p for glob in SOURCES for p in ROOT.glob(glob) if pattern.search(p.read_text())]
    assert not offenders


def test_entry_point_imports_no_heavy_library_before_training():
    heavy = ("torch", "transformers", "datasets")
    code = f"import sys, lightning_ft.train; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", "`--help` and config errors must not wait for torch/transformers/datasets to import"


def test_every_embedded_sample_file_is_packaged():
    """A non-editable install reads the samples from the wheel: pyproject's package-data must match each file."""
    import fnmatch

    # tomllib is Python 3.11+; the one line is easy to read.
    line = re.search(r'^"lightning_ft.samples" = (\[.*\])$', (ROOT / "pyproject.toml").read_text(), re.M)
    patterns = re.findall(r'"([^"]+)"', line.group(1))
    files = [p.relative_to(ROOT / "data").as_posix() for p in (ROOT / "data").rglob("*") if p.is_file()
             and p.suffix != ".py" and "__pycache__" not in p.parts]
    # setuptools globs: "**/" also matches no folder at all
    patterns += [p.removeprefix("**/") for p in patterns]
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
    assert files and not missing


def test_every_python_package_is_in_the_wheel():
    """pyproject names its packages one by one (conf/ and data/ are mapped into the package): a new task package
    must be listed there too, or a non-editable install lacks it."""
    listed = set(re.findall(r'^\s+"(lightning_ft[\w.]*)",$', (ROOT / "pyproject.toml").read_text(), re.M))
    found = {p.parent.relative_to(ROOT).as_posix().replace("/", ".") for p in ROOT.glob("lightning_ft/**/__init__.py")}
    assert found - listed == set(), f"add these to [tool.setuptools] packages in pyproject.toml: {found - listed}"
