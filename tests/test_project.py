"""Project hygiene: CI runs README's test command; the package layout stays importable."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("Run the tests:", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()


def test_ci_runs_the_readme_test_command():
    command = _readme_test_command()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, f"{command!r} from README.md is not a line of .ci/run"


def test_top_level_folders_map_to_the_optserve_namespace():
    import optserve.client
    import optserve.protos
    import optserve.server

    for module, folder in ((optserve.client, "client"), (optserve.protos, "protos"), (optserve.server, "server")):
        assert pathlib.Path(module.__file__).resolve().parent == ROOT / folder
        # Through optserve/'s links, which static analysis reads like any package directory.
        assert (ROOT / "optserve" / folder).is_symlink() and (ROOT / "optserve" / folder).resolve() == ROOT / folder


def _build_isolation() -> list[str]:
    """Build with this environment's setuptools when it can make wheels (no download), else let pip fetch one."""
    import importlib.util

    try:
        import setuptools
    except ImportError:  # a venv of Python >= 3.12 has none
        return []
    major_minor = tuple(int(part) for part in setuptools.__version__.split(".")[:2])
    if major_minor >= (70, 1) or importlib.util.find_spec("wheel") is not None:
        return ["--no-build-isolation"]
    return []


def test_the_wheel_holds_every_subpackage_and_imports_on_its_own(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", *_build_isolation(), "-q", "-w", str(tmp_path)],
        check=True,
        cwd=tmp_path,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("optserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "optserve/__init__.py",
        "optserve/server/optimizers/adam.py",
        "optserve/protos/optserve.proto",
        "optserve/protos/optserve_pb2.pyi",
        "optserve/client/transport.py",
    ):
        assert expected in names, expected
    assert not any(name.startswith(("tests/", "server/", "client/", "protos/", "benchmarks/")) for name in names)
    # Imported from the wheel alone (a zip on sys.path), not from this checkout.
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import optserve.server.model, optserve.server.app, "
        "optserve.client, optserve.server.optimizers.adam as adam; "
        "assert adam.__file__.startswith(sys.argv[1]), adam.__file__; "
        "from optserve.client import Client, SparseGradient"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script, str(wheel)], check=True, cwd=tmp_path, env=env, timeout=120)
