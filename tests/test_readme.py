"""The README's commands are the ones CI and users run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    test_cmds = [c for c in readme_commands() if "pytest" in c]
    assert len(test_cmds) == 1, "the README names exactly one test command"
    assert test_cmds[0] in ci_lines


def test_readme_quick_start_names_a_shipped_recipe():
    main = [c for c in readme_commands() if "cli.py run" in c]
    assert main, "the README shows how to run the embedded default"
    for cmd in main:
        recipe = re.search(r"cli\.py run (\S+)", cmd).group(1)
        assert (ROOT / recipe).is_file()
