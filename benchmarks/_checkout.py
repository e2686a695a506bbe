"""Lets a benchmark import partime from a source checkout that is not installed (say, a
GPU machine with only the repository copied onto it, run with `PYTHONPATH=.`).

`partime` reads its version from the installed package's metadata; where there is
none, this registers a minimal one (name and version, from `pyproject.toml`) in a
temporary folder on `sys.path`. Import it before anything that imports partime.
"""

import importlib.metadata
import re
import sys
import tempfile
from pathlib import Path


def register_metadata(name: str = "partime") -> None:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        version = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M)[1]
        site = Path(tempfile.mkdtemp(prefix=f"{name}-metadata-"))
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
        sys.path.append(str(site))
        importlib.invalidate_caches()


register_metadata()
