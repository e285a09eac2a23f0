"""Project hygiene: CI runs README's test command; the package layout stays importable."""
from __future__ import annotations

import pathlib
import re

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
        assert pathlib.Path(module.__file__).parent == ROOT / folder
