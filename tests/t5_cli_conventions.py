"""The conventions people expect of a command-line tool: shell completion and a man page made from the commands."""

from __future__ import annotations

import os
import shutil
import subprocess

import click
import pytest

from squashfu_fs.cli import main

from .harness import CLI, squashfu


def test_the_man_page_names_every_command_and_option_and_groff_reads_it_cleanly(tmp_path: object) -> None:
    page = squashfu("man").stdout
    assert page.startswith(".TH SQUASHFU 1 ")
    ctx = click.Context(main, info_name="squashfu")
    for name in main.list_commands(ctx):
        command = main.get_command(ctx, name)
        assert command is not None
        assert f".SS {name}\n" in page, name
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--"):
                    assert opt.replace("-", "\\-") in page, (name, opt)
    assert shutil.which("groff"), "groff is missing: make install installs groff-base"
    checked = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=page, capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_are_clicks_own(shell: str) -> None:
    assert "_SQUASHFU_COMPLETE" in squashfu("completion", shell).stdout


def test_bash_completion_completes_commands_and_options() -> None:
    def complete(words: str) -> list[str]:
        env = {**os.environ, "_SQUASHFU_COMPLETE": "bash_complete", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
        out = subprocess.run(CLI, env=env, capture_output=True, text=True, check=True).stdout
        return [line.split(",", 1)[1] for line in out.splitlines() if "," in line]

    assert "backup" in complete("squashfu ba") and "verify" in complete("squashfu ve")
    assert "--dry-run" in complete("squashfu backup --d")
