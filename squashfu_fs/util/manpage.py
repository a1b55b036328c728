"""A man page (roff) generated from the click command tree, so it never disagrees with ``--help``."""

from __future__ import annotations

from datetime import date

import click


def _roff(text: str) -> str:
    """Escape text for roff: backslashes, and a leading dot or quote that would read as a request."""
    lines = text.replace("\\", "\\e").replace("-", "\\-").splitlines()
    return "\n".join("\\&" + ln if ln.startswith((".", "'")) else ln for ln in lines)


def _options(command: click.Command, ctx: click.Context) -> list[str]:
    out = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        out += [".TP", f"\\fB{_roff(names)}\\fR", _roff(help_text or "")]
    return out


def render(group: click.Group, name: str, version: str, *, today: date | None = None) -> str:
    """The whole page: NAME, SYNOPSIS, global options, then one section per command with its options."""
    ctx = click.Context(group, info_name=name)
    when = (today or date.today()).isoformat()
    summary = (group.help or "").strip().splitlines()[0] if group.help else ""
    out = [f'.TH {name.upper()} 1 "{when}" "{name} {version}" "User Commands"',
           ".SH NAME", f"{name} \\- {_roff(summary)}",
           ".SH SYNOPSIS", f"\\fB{name}\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
           ".SH DESCRIPTION", _roff(group.help or ""),
           ".SH OPTIONS", *_options(group, ctx),
           ".SH COMMANDS"]
    for cmd_name in group.list_commands(ctx):
        command = group.get_command(ctx, cmd_name)
        if command is None or command.hidden:
            continue
        sub = click.Context(command, info_name=cmd_name, parent=ctx)
        usage = " ".join(command.collect_usage_pieces(sub))
        out += [f".SS {cmd_name}", f"\\fB{name} {cmd_name}\\fR {_roff(usage)}", ".PP", _roff(command.help or ""),
                *_options(command, sub)]
    out += [".SH SEE ALSO", "The project's docs/ directory: commands.md, filesystem.md, operations.md."]
    return "\n".join(out) + "\n"
