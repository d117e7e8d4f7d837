"""The cache directory (patterncc.cachedir) and the parser's tables kept in it."""

import os

import pytest

import patterncc as pcc
from patterncc import cachedir, parser


@pytest.fixture
def fresh_parser(tmp_path, monkeypatch):
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path / "cache"))
    parser._parser.cache_clear()
    yield tmp_path / "cache"
    parser._parser.cache_clear()


def _tables(directory):
    return sorted(directory.glob("lark-*.pickle"))


def test_the_parser_keeps_its_tables_and_loads_them(fresh_parser):
    assert pcc.parse("strided(128)") == pcc.parse("strided(128)")
    (entry,) = _tables(fresh_parser)
    written = entry.stat().st_mtime_ns
    parser._parser.cache_clear()  # as a new process: the tables come from the file, not rebuilt
    assert pcc.parse("fixed(128, 32)") is not None
    assert entry.stat().st_mtime_ns == written


def test_a_corrupt_tables_file_is_rebuilt(fresh_parser):
    pcc.parse("causal")
    (entry,) = _tables(fresh_parser)
    entry.write_bytes(b"not a cache\n\x00\x01")
    parser._parser.cache_clear()
    assert pcc.parse("sliding_window(64)") is not None
    with pytest.raises(pcc.PatternSyntaxError):
        pcc.parse("sliding_window(64")  # errors still name what was expected


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="ownership is a POSIX notion")
def test_a_directory_others_may_write_keeps_no_tables(fresh_parser):
    fresh_parser.mkdir()
    fresh_parser.chmod(0o777)
    assert cachedir.private_dir() is None
    assert pcc.parse("strided(16)") is not None
    assert _tables(fresh_parser) == []


def test_an_unusable_directory_keeps_no_tables(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(blocker / "cache"))  # under a file: cannot be made
    parser._parser.cache_clear()
    try:
        assert cachedir.private_dir() is None
        assert pcc.parse("causal & local(8)") is not None
    finally:
        parser._parser.cache_clear()


def test_the_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("PATTERNCC_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cachedir.cache_dir() == tmp_path / "patterncc"
    monkeypatch.setenv("PATTERNCC_CACHE_DIR", str(tmp_path / "x"))
    assert cachedir.cache_dir() == tmp_path / "x"
