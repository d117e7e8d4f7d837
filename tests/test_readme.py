"""Every code block of the README runs (or says, visibly, why it does not).

Fenced blocks by language:

- ``python``: executed in the repository root, each in a fresh namespace;
  ``test_*`` functions it defines are called;
- ``bash``: each line is a ``patterncc`` command, run through the CLI's
  entry point, that must exit 0;
- ``console``: ``$ command`` lines and the output they print; ``patterncc``
  commands run through the entry point, others through bash, in a temporary
  directory; the output must match line by line (``...`` stands for any
  number of lines);
- ``pat``: a ``.pat`` source that must parse;
- ``tree``: a map of the repository whose paths must exist.

A block whose first line is ``# not run by tests/test_readme.py: <why>`` is
counted and not run; ``NOT_RUN`` is how many there are, so a new block runs
unless it says why not, visibly.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from patterncc import cli, testing

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = "# not run by tests/test_readme.py:"
NOT_RUN = 3  # the setup/test scripts; the command synopsis; the torchrun script


def blocks() -> list[tuple[int, str, str]]:
    """``(line, language, text)`` of every fenced block."""
    out, lang, start, body = [], None, 0, []
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, body = line[3:].strip(), number, []
            else:
                out.append((start, lang, "\n".join(body)))
                lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"README.md: the block opened at line {start} is not closed"
    return out


def test_every_block_runs_or_says_why_not():
    found = blocks()
    skipped = [(line, text.splitlines()[0]) for line, _, text in found if text.startswith(MARKER)]
    for line, first in skipped:
        assert len(first) > len(MARKER) + 5, f"README.md:{line}: say why the block is not run"
    assert len(skipped) == NOT_RUN, f"not-run blocks changed: {skipped}"
    unknown = [(line, lang) for line, lang, text in found
               if lang not in RUNNERS and not text.startswith(MARKER)]
    assert not unknown, f"blocks without a runner (label them, or mark them not run): {unknown}"
    assert len(found) - NOT_RUN >= 8


@pytest.mark.parametrize("line,lang,text", [pytest.param(*b, id=f"line{b[0]}-{b[1]}")
                                             for b in blocks() if not b[2].startswith(MARKER)])
def test_readme_block(line, lang, text, tmp_path, monkeypatch, capsys):
    RUNNERS[lang](text, tmp_path, monkeypatch, capsys)


def _python(text, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # "auto" picks as on a user's CPU machine
    # The kit's Triton checks run in test_testing_kit.py; here the block itself is under test.
    monkeypatch.setattr(testing.suite, "available_backends", lambda: {"reference": None})
    namespace = {"__name__": "readme_block"}
    exec(compile(text, str(README), "exec"), namespace)
    for name, fn in list(namespace.items()):
        if name.startswith("test_") and callable(fn):
            fn()


def _cli(command: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(shlex.split(command)[1:])
        except SystemExit as exit:
            code = exit.code
    return code, out.getvalue() + err.getvalue()


def _bash(text, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    for command in filter(None, (line.split("  #")[0].strip() for line in text.splitlines())):
        assert command.startswith("patterncc "), f"not a patterncc command: {command}"
        code, output = _cli(command)
        assert code == 0, output


def _console(text, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        command = lines[i].removeprefix("$ ")
        expected = []
        i += 1
        while i < len(lines) and not lines[i].startswith("$ "):
            expected.append(lines[i])
            i += 1
        if command.startswith("patterncc "):
            _, output = _cli(command)
        else:
            output = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True).stdout
        _match(command, expected, output.splitlines())


def _match(command: str, expected: list[str], got: list[str]) -> None:
    """Line by line, trailing spaces ignored; ``...`` matches any run of lines."""
    pattern = "".join(r"(?:.*\n)*?" if e.strip() == "..." else re.escape(e.rstrip()) + r"\n" for e in expected)
    text = "".join(g.rstrip() + "\n" for g in got)
    assert re.fullmatch(pattern + (r"(?:.*\n)*" if expected and expected[-1].strip() == "..." else ""), text), (
        f"$ {command}\nREADME shows:\n" + "\n".join(expected) + "\nthe program prints:\n" + text)


def _pat(text, tmp_path, monkeypatch, capsys):
    import patterncc as pcc

    pcc.parse(text, "README.md")


def _tree(text, tmp_path, monkeypatch, capsys):
    for line in text.splitlines():
        path = line.split()[0]
        assert (ROOT / path).exists(), f"README's repository map names {path}, which does not exist"


RUNNERS = {"python": _python, "bash": _bash, "console": _console, "pat": _pat, "tree": _tree}


def test_quickstart_runs_from_any_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([os.sys.executable, str(ROOT / "examples" / "quickstart.py")], cwd=tmp_path,
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "relative error" in result.stdout


def test_documented_limits_are_the_real_ones():
    from patterncc import blocklayout, ir, masks, parser, resolve

    text = README.read_text()
    for row, value in [
        ("| source text | 256 KiB |", parser.MAX_SOURCE_CHARS == 256 * 1024),
        ("| nesting | 200 deep |", parser.MAX_DEPTH == 200),
        ("| nodes after inlining definitions | 50,000 |", resolve.MAX_NODES == 50_000),
        ("| integer literals and arguments | within int32 (2^31 - 1) |", ir.MAX_VALUE == 2**31 - 1),
        ("| heads | 4,096 |", ir.MAX_HEADS == 4096),
        ("| `pcc.mask` | 2^28 elements, all heads together |", masks.MAX_MASK_ELEMENTS == 2**28),
        ("| layouts and plans: candidate block pairs examined | 2^26, all heads together |",
         blocklayout.MAX_CANDIDATES == 2**26),
        ("| layouts and plans: single elements evaluated | 2^28, all heads together |",
         blocklayout.MAX_ELEMENT_EVALS == 2**28),
        ("| `pcc.sparse_mask`: allowed elements | 2^27, all heads together |",
         blocklayout.MAX_SPARSE_ELEMENTS == 2**27),
        ("| blocks a side (`ceil(seq_len / block)`) | 2^24 |", blocklayout.MAX_BLOCKS == 2**24),
    ]:
        assert row in text and value, row
