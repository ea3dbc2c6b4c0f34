"""The README's Quickstart is what users and CI run: keep it true."""

from __future__ import annotations

import re

from conftest import ROOT


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip()]


def test_quickstart_has_two_commands_and_ci_runs_the_test_one():
    cmds = quickstart_commands()
    assert len(cmds) == 2
    run_main, run_tests = cmds
    assert "ema-avg fixtures/" in run_main and "pip install ." in run_main
    assert "pip install -e '.[test]'" in run_tests and "pytest" in run_tests
    ci = (ROOT / ".ci" / "run").read_text()
    # CI installs the same extras and runs the same test command in a fresh venv
    assert "pip install -q -e '.[test]'" in ci  # editable: ema_cli._ckernel is built into the checkout
    assert run_tests.split("&& ")[-1] in ci
    assert "python3 -m venv" in ci


def test_readme_documents_every_option():
    """Every option of every command appears in the README."""
    import typer

    from ema_cli.cli import app

    text = (ROOT / "README.md").read_text()
    cmd = typer.main.get_command(app)
    missing = []
    for name, sub in cmd.commands.items():
        assert f"`{name}`" in text or f"ema-avg {name}" in text, name
        for p in sub.params:
            for opt in p.opts:
                if opt.startswith("--") and opt != "--help" and opt not in text:
                    missing.append(f"{name} {opt}")
    assert not missing, missing
