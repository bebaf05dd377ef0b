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
