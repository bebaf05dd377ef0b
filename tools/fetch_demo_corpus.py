"""Build the demo corpus (JSONL) from Debian documentation packages.

Sources (English only, plain text): the Linux kernel docs (.rst/.txt), the Python docs (HTML),
the Debian Administrator's Handbook (HTML, en-US) and GCIDE, a GPL English dictionary (Webster's 1913 + WordNet)
(dictd format). The .deb files are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``
into a temp dir; nothing is installed and no third-party text goes into the repository.

Each output line is ``{"text": ..., "source": <package>, "id": <path in the package or dict chunk>}``.
GCIDE entries are grouped into documents of consecutive entries (dictionary order) that share the
headword's first letter, about 50 KB each.

    python tools/fetch_demo_corpus.py [--output PATH] [--cache-dir DIR] [--force]

An existing ``--output`` is summarized, and rebuilt (replaced) only with ``--force``; the new file is
written under a temporary name and renamed into place.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from megatron_subnet.cache import cache_dir  # noqa: E402
from megatron_subnet.cli import ArgumentParser, one_line, run_main  # noqa: E402
from megatron_subnet.outputs import check_not_nested, check_writable_location, write_file_atomically  # noqa: E402

# In this order; meta packages are resolved to the versioned package that holds the files.
PACKAGES = ("linux-doc", "python3-doc", "dict-gcide", "debian-handbook")
META_PACKAGES = {"linux-doc", "python3-doc"}
MIN_CHARS = 200
GCIDE_DOC_CHARS = 50_000
Doc = tuple[str, str]  # (id, text)


class CorpusError(RuntimeError):
    """A step that failed; main prints it as one line."""


# ---------------------------------------------------------------- fetching


def resolve_package(meta: str) -> str:
    """The versioned package behind a meta package (``linux-doc`` -> ``linux-doc-6.1``): its first
    dependency per ``apt-cache depends``; ``meta`` itself if that fails."""
    try:
        out = subprocess.run(["apt-cache", "depends", meta], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return meta
    for line in out.splitlines():
        m = re.match(r"\s*\|?Depends:\s*([^\s<]\S*)", line)
        if m:
            return m.group(1)
    return meta


def download(pkg: str, debs: Path) -> Path:
    """``apt-get download pkg`` into ``debs`` (retrying after ``apt-get update`` once); skip if present."""
    found = sorted(debs.glob(f"{pkg}_*.deb"))
    if found:
        return found[-1]
    debs.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"apt-get download {pkg} failed; running apt-get update and retrying", flush=True)
        subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        proc = subprocess.run(["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True)
    found = sorted(debs.glob(f"{pkg}_*.deb"))
    if proc.returncode != 0 or not found:
        msg = next((ln for ln in proc.stderr.splitlines() if ln.startswith("E:")), proc.stderr.strip()[-200:])
        raise CorpusError(f"apt-get download {pkg} failed: {msg}")
    return found[-1]


def unpack(deb: Path, dest: Path) -> Path:
    """``dpkg-deb -x deb dest`` (extracts the files; installs nothing)."""
    proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CorpusError(f"dpkg-deb -x {deb} failed: {proc.stderr.strip()}")
    return dest


# ---------------------------------------------------------------- text extraction

_WS = re.compile(r"\s+")
_BLOCK = set("p div section article main h1 h2 h3 h4 h5 h6 ul ol dl table caption blockquote figure hr".split())
_LINE = {"br", "li", "dt", "dd", "tr"}
_CELL = {"td", "th"}
# Subtrees dropped whole: page chrome of Sphinx (Python docs) and Publican (Debian handbook).
_SKIP_TAGS = set("head script style nav noscript form button svg template iframe".split())
_SKIP_CLASSES = set("headerlink sphinxsidebar related footer mobile-nav menu-wrapper docnav toc".split())
_SKIP_IDS = {"banner", "title", "search", "sidebar"}
_VOID = set("area base br col embed hr img input link meta source track wbr".split())


class _HTMLText(HTMLParser):
    """Collects the readable text of a page as paragraphs; navigation chrome is dropped."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._buf: list[str] = []
        self._skip_tag: str | None = None
        self._skip_depth = 0
        self._pre = 0

    def _skip(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        if tag in _SKIP_TAGS:
            return True
        a = dict(attrs)
        if a.get("role") in ("navigation", "search") or a.get("id") in _SKIP_IDS:
            return True
        return not _SKIP_CLASSES.isdisjoint((a.get("class") or "").split())

    def _flush(self, pre: bool = False) -> None:
        text, self._buf = "".join(self._buf), []
        if pre:
            lines = [ln.rstrip() for ln in text.split("\n")]
            while lines and not lines[0]:
                lines.pop(0)
        else:
            lines = [" ".join(ln.split()) for ln in text.split("\n")]
            lines = [ln for ln in lines if ln]
        while lines and not lines[-1]:
            lines.pop()
        if lines:
            self.paragraphs.append("\n".join(lines))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip_tag is not None:
            self._skip_depth += tag == self._skip_tag
            return
        if tag not in _VOID and self._skip(tag, attrs):
            self._skip_tag, self._skip_depth = tag, 1
            return
        if tag == "pre":
            self._flush()
            self._pre += 1
        elif tag in _BLOCK:
            self._flush(self._pre > 0)
        elif tag in _LINE:
            self._buf.append("\n")
        elif tag in _CELL:
            self._buf.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skip_tag = None
            return
        if tag == "pre" and self._pre:
            self._flush(pre=True)
            self._pre -= 1
        elif tag in _BLOCK:
            self._flush(self._pre > 0)
        elif tag in _LINE and tag != "br":
            self._buf.append("\n")

    def handle_data(self, data: str) -> None:
        if self._skip_tag is None:
            self._buf.append(data if self._pre else _WS.sub(" ", data))

    def text(self) -> str:
        self._flush(self._pre > 0)
        return "\n\n".join(self.paragraphs)


def html_to_text(html: str) -> str:
    """Readable text of an HTML page: paragraphs separated by blank lines, no scripts/styles/navigation."""
    p = _HTMLText()
    p.feed(html)
    p.close()
    return p.text()


def read_text(path: Path) -> str | None:
    """A (possibly gzipped) file as text, or None if it looks binary."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    if b"\x00" in data[:8192]:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def clean(text: str) -> str:
    """Strip trailing spaces and runs of blank lines."""
    text = "\n".join(ln.rstrip() for ln in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _files(root: Path, sub: str) -> list[Path]:
    """Regular files (not symlinks) under root/sub, sorted."""
    base = root / sub
    return sorted(p for p in base.rglob("*") if p.is_file() and not p.is_symlink())


def linux_docs(root: Path, pkg: str) -> Iterator[Doc]:
    """The kernel's Documentation/ sources (.rst/.txt, gzipped or not), translations left out."""
    base = root / "usr/share/doc" / pkg / "Documentation"
    for p in _files(root, f"usr/share/doc/{pkg}/Documentation"):
        rel = p.relative_to(base)
        name = p.name[:-3] if p.name.endswith(".gz") else p.name
        if rel.parts[0] == "translations" or not name.endswith((".rst", ".txt")):
            continue
        text = read_text(p)
        if text is not None:
            yield f"Documentation/{rel.as_posix().removesuffix('.gz')}", text


_PY_SKIP = re.compile(r"^(genindex.*|py-modindex|search|contents|download)\.html$")


def python_docs(root: Path, pkg: str) -> Iterator[Doc]:
    """The Python HTML docs without indexes, search page and Sphinx internals (``_sources`` etc.)."""
    base = root / "usr/share/doc" / pkg / "html"
    for p in _files(root, f"usr/share/doc/{pkg}/html"):
        rel = p.relative_to(base)
        if p.suffix != ".html" or rel.parts[0].startswith("_") or _PY_SKIP.match(rel.as_posix()):
            continue
        yield f"html/{rel.as_posix()}", html_to_text(p.read_text(encoding="utf-8", errors="replace"))


def handbook_docs(root: Path, pkg: str) -> Iterator[Doc]:
    """The Debian Administrator's Handbook, en-US HTML only."""
    base = root / "usr/share/doc" / pkg / "html/en-US"
    for p in _files(root, f"usr/share/doc/{pkg}/html/en-US"):
        rel = p.relative_to(base)
        if p.suffix == ".html" and rel.parts[0] != "Common_Content":
            yield f"html/en-US/{rel.as_posix()}", html_to_text(p.read_text(encoding="utf-8", errors="replace"))


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {c: i for i, c in enumerate(_B64)}
# Lines that only cite where a sense came from: [1913 Webster], [WordNet 1.5 +PJC], [RDH] ...
_SOURCE_TAG = re.compile(r"^[ \t]*\[[^\]\n]*\b(Webster|WordNet|PJC|Century|RDH|AS)\b[^\]\n]*\][ \t]*\n?", re.M)


def dictd_number(s: str) -> int:
    """Decode a dictd index number (big-endian base 64, alphabet A-Z a-z 0-9 + /)."""
    n = 0
    for c in s:
        if c not in _B64_VALUE:
            raise ValueError(f"bad dictd index number {s!r}")
        n = n * 64 + _B64_VALUE[c]
    return n


def parse_dictd_index(lines: Iterator[str] | list[str]) -> list[tuple[str, int, int]]:
    """``headword<TAB>offset<TAB>length`` lines -> [(headword, offset, length)]."""
    out = []
    for line in lines:
        parts = line.rstrip("\n").split("\t")
        if len(parts) >= 3:
            out.append((parts[0], dictd_number(parts[1]), dictd_number(parts[2])))
    return out


def dict_entries(index: list[tuple[str, int, int]], data: bytes) -> list[tuple[str, str]]:
    """Unique entries in file order as (first headword, text); several headwords may share one entry.
    dictd's own ``00-database-*`` metadata entries are left out."""
    first: dict[tuple[int, int], str] = {}
    for word, off, length in index:
        first.setdefault((off, length), word)
    entries = []
    for (off, length), word in sorted(first.items()):
        if not word.startswith("00-database"):
            entries.append((word, data[off:off + length].decode("utf-8", errors="replace")))
    return entries


def gcide_text(entry: str) -> str:
    """Light cleanup of a GCIDE entry: drop ``{}`` cross-reference braces and ``[1913 Webster]`` tags."""
    return _SOURCE_TAG.sub("", entry.replace("{", "").replace("}", ""))


def group_entries(entries: list[tuple[str, str]], max_chars: int = GCIDE_DOC_CHARS) -> Iterator[Doc]:
    """Consecutive entries with the same initial letter, cut into documents of about ``max_chars``.
    Entries that start with no letter (``-able``, ``1st``) stay with the current run."""
    chunk: list[str] = []
    size, key, first = 0, "", ""
    for word, text in entries:
        k = text.lstrip()[:1].lower()
        if not k.isalpha():
            k = key or "#"
        if chunk and (k != key or size >= max_chars):
            yield f"gcide/{key}/{first}", "\n\n".join(chunk)
            chunk, size = [], 0
        if not chunk:
            key, first = k, word
        text = clean(gcide_text(text))
        chunk.append(text)
        size += len(text) + 2
    if chunk:
        yield f"gcide/{key}/{first}", "\n\n".join(chunk)


def gcide_docs(root: Path, pkg: str) -> Iterator[Doc]:
    base = root / "usr/share/dictd"
    with open(base / "gcide.index", encoding="utf-8") as f:
        index = parse_dictd_index(f)
    with gzip.open(base / "gcide.dict.dz") as f:  # dictzip is gzip with a seek table in the header
        data = f.read()
    yield from group_entries(dict_entries(index, data))


EXTRACTORS = {"linux-doc": linux_docs, "python3-doc": python_docs, "debian-handbook": handbook_docs,
              "dict-gcide": gcide_docs}


# ---------------------------------------------------------------- main


def summarize(path: Path) -> dict[str, tuple[int, int]]:
    """source -> (documents, UTF-8 bytes of text) of an existing corpus file."""
    stats: dict[str, tuple[int, int]] = {}
    number = 1
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                n, c = stats.get(d["source"], (0, 0))
                stats[d["source"]] = (n + 1, c + len(d["text"].encode("utf-8")))
                number += 1
    except (ValueError, KeyError, TypeError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise CorpusError(f"--output {path}: line {number} is not a corpus line ({type(e).__name__}: {e}); "
                          "--force rebuilds it") from None
    return stats


def build(out: Path, work: Path) -> dict[str, tuple[int, int]]:
    """Fetch, unpack and convert every package into ``out`` (written to a temp file, then renamed)."""
    stats: dict[str, tuple[int, int]] = {}

    def fill(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for meta in PACKAGES:
                pkg = resolve_package(meta) if meta in META_PACKAGES else meta
                deb = download(pkg, work / "debs")
                n = chars = 0
                # The unpacked trees (~400 MB) are rebuilt in seconds from the cached .debs; don't keep them.
                with tempfile.TemporaryDirectory(dir=work, prefix="unpack-") as tmpdir:
                    root = unpack(deb, Path(tmpdir))
                    docs = tqdm(EXTRACTORS[meta](root, pkg), desc=pkg, unit=" docs", mininterval=1)
                    for doc_id, text in docs:
                        text = clean(text)
                        if len(text) < MIN_CHARS:
                            continue
                        f.write(json.dumps({"text": text, "source": pkg, "id": doc_id}, ensure_ascii=False) + "\n")
                        n, chars = n + 1, chars + len(text.encode("utf-8"))
                stats[pkg] = (n, chars)

    write_file_atomically(out, fill)
    return stats


def _main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, default=None,
                   help="JSONL to write (default: <cache>/demo_corpus/corpus.jsonl)")
    p.add_argument("--cache-dir", type=Path, default=None, help="cache root; .deb files go to <cache>/demo_corpus/debs "
                   "(default: $MEGATRON_SUBNET_CACHE or ~/.cache/megatron_subnet)")
    p.add_argument("--force", action="store_true", help="rebuild the JSONL even if it exists (replacing it)")
    args = p.parse_args(argv)
    work = (args.cache_dir or cache_dir()) / "demo_corpus"
    out = args.output or work / "corpus.jsonl"
    t0 = time.perf_counter()
    try:
        if out.is_file() and not args.force:
            print(f"{out} exists; summarizing it (--force rebuilds)")
            stats = summarize(out)
        else:
            check_writable_location(out, "--output", "file")
            check_not_nested(out, "--output", {"--cache-dir": work / "debs"})
            stats = build(out, work)
    except CorpusError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    for src, (n, c) in stats.items():
        print(f"  {src:<20} {n:>7} docs  {c / 1e6:8.2f} MB")
    n, c = sum(s[0] for s in stats.values()), sum(s[1] for s in stats.values())
    print(f"  {'total':<20} {n:>7} docs  {c / 1e6:8.2f} MB  (UTF-8 text)")
    print(f"corpus: {out}  ({out.stat().st_size / 1e6:.1f} MB on disk, {time.perf_counter() - t0:.1f}s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: one ``error:`` line and a non-zero exit on failure, 130 on Ctrl-C."""
    return run_main(_main, argv, error_code=1)


if __name__ == "__main__":
    sys.exit(main())
