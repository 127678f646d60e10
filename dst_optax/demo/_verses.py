"""English→Spanish parallel Bible verses read from Debian's SWORD module packages.

Two public-domain translations come as SWORD modules in Debian ``bookworm``:
``sword-text-web`` (World English Bible, module ``engWEB2015eb``, NRSVA versification) and
``sword-text-sparv`` (Reina-Valera 1909, module ``spaRV1909eb``, KJV versification). The
``.deb`` files are fetched with ``apt-get download`` into the demo cache, pinned by version and
sha256, and read in pure Python: the ``ar`` archive holds ``data.tar.xz``, which holds the
module's ``.conf`` and its zText files. No SWORD library or ``diatheke`` is needed.

zText layout, per testament (``ot``/``nt``): ``.bzs`` lists compressed blocks as little-endian
``uint32`` triples (offset into ``.bzz``, compressed size, uncompressed size); ``.bzv`` holds one
``(uint32 block, uint32 offset, uint16 size)`` entry per verse index; ``.bzz`` concatenates the
zlib-compressed blocks. A testament's verse indices are: 0 module heading, 1 testament heading,
then for each book a book heading, and for each chapter a chapter heading followed by its
verses. Both modules share the KJV layout of the 66 books, except that NRSVA gives 3 John 1 and
Revelation 12 one verse more and appends the deuterocanonical books to the Old Testament (these
are skipped: they come after Malachi and have no Spanish counterpart).

Pairs are keyed by (book, chapter, verse) with OSIS book ids, after markup clean-up (Strong's
``<w>`` tags, footnotes, cross references, section headings and speaker labels removed;
whitespace normalised). Verses empty on either side are dropped, and so is the verse before
such a gap, because one translation usually merged the missing verse into it. Chapters where the
Reina-Valera module numbers verses differently from its declared KJV versification (found by
comparing verse lengths of the two translations) are dropped too: ``MISNUMBERED_CHAPTERS``.

Fixed split by book: ``VALIDATION_BOOKS`` and ``TEST_BOOKS`` are held out, every other book is
training data, so no chapter's context leaks across splits. The aligned pairs are cached as
JSONL next to the ``.deb`` files.
"""

from __future__ import annotations

import html
import io
import json
import pathlib
import re
import shutil
import struct
import subprocess
import tarfile
import zlib
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from dst_optax.demo import _fetch


class DebSource(NamedTuple):
  """A pinned Debian package that ``apt-get download`` saves into the cache.

  Attributes:
    package: Debian package name.
    version: exact Debian version.
    sha256: lowercase hex sha256 of the ``.deb``.
  """

  package: str
  version: str
  sha256: str

  @property
  def deb_name(self) -> str:
    """The file name ``apt-get download`` gives the package."""
    return f"{self.package}_{self.version}_all.deb"

  @property
  def pool_url(self) -> str:
    """Where a Debian mirror serves the ``.deb``, for fetching it by hand."""
    return (
      f"https://deb.debian.org/debian/pool/main/{self.package[0]}/{self.package}/{self.deb_name}"
    )


WEB_SOURCE = DebSource(
  "sword-text-web", "426.0-1", "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1"
)
SPARV_SOURCE = DebSource(
  "sword-text-sparv", "2.60-1", "5c87f9b2bc97457e8a872f5bae7ea7ce59cb3de1dcee73e4d4740451863694cf"
)
SPLITS = ("train", "validation", "test")
VALIDATION_BOOKS = ("Ruth", "Esth", "Joel", "Phil", "Jas")
TEST_BOOKS = ("Eccl", "Mark", "1Pet")
# Chapters of spaRV1909eb 2.60 whose verses are shifted against the WEB (Hebrew or Spanish verse
# numbering inside a KJV-versified module), e.g. its Jonah 2:1 is KJV Jonah 1:17.
MISNUMBERED_CHAPTERS = frozenset(
  {
    ("Num", 13),
    ("Num", 30),
    ("1Sam", 24),
    ("1Kgs", 22),
    ("1Chr", 21),
    ("2Chr", 33),
    ("Job", 39),
    ("Job", 40),
    ("Hos", 12),
    ("Jonah", 2),
  }
)
# Bumped whenever parsing or clean-up changes, so stale JSONL caches are rebuilt.
_PAIRS_FORMAT = 1
_SWORD_ROOT = "usr/share/sword/"
_OT_BOOKS = 39
# KJV versification: OSIS book id and the number of verses of each chapter.
_KJV_BOOKS = (
  (
    "Gen",
    "31 25 24 26 32 22 24 22 29 32 32 20 18 24 21 16 27 33 38 18 34 24 20 67 34 35 46 22 "
    "35 43 55 32 20 31 29 43 36 30 23 23 57 38 34 34 28 34 31 22 33 26",
  ),
  (
    "Exod",
    "22 25 22 31 23 30 25 32 35 29 10 51 22 31 27 36 16 27 25 26 36 31 33 18 40 37 21 43 "
    "46 38 18 35 23 35 35 38 29 31 43 38",
  ),
  ("Lev", "17 16 17 35 19 30 38 36 24 20 47 8 59 57 33 34 16 30 37 27 24 33 44 23 55 46 34"),
  (
    "Num",
    "54 34 51 49 31 27 89 26 23 36 35 16 33 45 41 50 13 32 22 29 35 41 30 25 18 65 23 31 "
    "40 16 54 42 56 29 34 13",
  ),
  (
    "Deut",
    "46 37 29 49 33 25 26 20 29 22 32 32 18 29 23 22 20 22 21 20 23 30 25 22 19 19 26 68 "
    "29 20 30 52 29 12",
  ),
  ("Josh", "18 24 17 24 15 27 26 35 27 43 23 24 33 15 63 10 18 28 51 9 45 34 16 33"),
  ("Judg", "36 23 31 24 31 40 25 35 57 18 40 15 25 20 20 31 13 31 30 48 25"),
  ("Ruth", "22 23 18 22"),
  (
    "1Sam",
    "28 36 21 22 12 21 17 22 27 27 15 25 23 52 35 23 58 30 24 42 15 23 29 22 44 25 12 25 11 31 13",
  ),
  ("2Sam", "27 32 39 12 25 23 29 18 13 19 27 31 39 33 37 23 29 33 43 26 22 51 39 25"),
  ("1Kgs", "53 46 28 34 18 38 51 66 28 29 43 33 34 31 34 34 24 46 21 43 29 53"),
  ("2Kgs", "18 25 27 44 27 33 20 29 37 36 21 21 25 29 38 20 41 37 37 21 26 20 37 20 30"),
  ("1Chr", "54 55 24 43 26 81 40 40 44 14 47 40 14 17 29 43 27 17 19 8 30 19 32 31 31 32 34 21 30"),
  (
    "2Chr",
    "17 18 17 22 14 42 22 18 31 19 23 16 22 15 19 14 19 34 11 37 20 12 21 27 28 23 9 27 "
    "36 27 21 33 25 33 27 23",
  ),
  ("Ezra", "11 70 13 24 17 22 28 36 15 44"),
  ("Neh", "11 20 32 23 19 19 73 18 38 39 36 47 31"),
  ("Esth", "22 23 15 17 14 14 10 17 32 3"),
  (
    "Job",
    "22 13 26 21 27 30 21 22 35 22 20 25 28 22 35 22 16 21 29 29 34 30 17 25 6 14 23 28 "
    "25 31 40 22 33 37 16 33 24 41 30 24 34 17",
  ),
  (
    "Ps",
    "6 12 8 8 12 10 17 9 20 18 7 8 6 7 5 11 15 50 14 9 13 31 6 10 22 12 14 9 11 12 24 11 "
    "22 22 28 12 40 22 13 17 13 11 5 26 17 11 9 14 20 23 19 9 6 7 23 13 11 11 17 12 8 12 "
    "11 10 13 20 7 35 36 5 24 20 28 23 10 12 20 72 13 19 16 8 18 12 13 17 7 18 52 17 16 "
    "15 5 23 11 13 12 9 9 5 8 28 22 35 45 48 43 13 31 7 10 10 9 8 18 19 2 29 176 7 8 9 4 "
    "8 5 6 5 6 8 8 3 18 3 3 21 26 9 8 24 13 10 7 12 15 21 10 20 14 9 6",
  ),
  (
    "Prov",
    "33 22 35 27 23 35 27 36 18 32 31 28 25 35 33 33 28 24 29 30 31 29 35 34 28 28 27 28 27 33 31",
  ),
  ("Eccl", "18 26 22 16 20 12 29 17 18 20 10 14"),
  ("Song", "17 17 11 16 16 13 13 14"),
  (
    "Isa",
    "31 22 26 6 30 13 25 22 21 34 16 6 22 32 9 14 14 7 25 6 17 25 18 23 12 21 13 29 24 33 "
    "9 20 24 17 10 22 38 22 8 31 29 25 28 28 25 13 15 22 26 11 23 15 12 17 13 12 21 14 21 "
    "22 11 12 19 12 25 24",
  ),
  (
    "Jer",
    "19 37 25 31 31 30 34 22 26 25 23 17 27 22 21 21 27 23 15 18 14 30 40 10 38 24 22 17 "
    "32 24 40 44 26 22 19 32 21 28 18 16 18 22 13 30 5 28 7 47 39 46 64 34",
  ),
  ("Lam", "22 22 66 22 22"),
  (
    "Ezek",
    "28 10 27 17 17 14 27 18 11 22 25 28 23 23 8 63 24 32 14 49 32 31 49 27 17 21 36 26 "
    "21 26 18 32 33 31 15 38 28 23 29 49 26 20 27 31 25 24 23 35",
  ),
  ("Dan", "21 49 30 37 31 28 28 27 27 21 45 13"),
  ("Hos", "11 23 5 19 15 11 16 14 17 15 12 14 16 9"),
  ("Joel", "20 32 21"),
  ("Amos", "15 16 15 13 27 14 17 14 15"),
  ("Obad", "21"),
  ("Jonah", "17 10 10 11"),
  ("Mic", "16 13 12 13 15 16 20"),
  ("Nah", "15 13 19"),
  ("Hab", "17 20 19"),
  ("Zeph", "18 15 20"),
  ("Hag", "15 23"),
  ("Zech", "21 13 10 14 11 15 14 23 17 12 17 14 9 21"),
  ("Mal", "14 17 18 6"),
  ("Matt", "25 23 17 25 48 34 29 34 38 42 30 50 58 36 39 28 27 35 30 34 46 46 39 51 46 75 66 20"),
  ("Mark", "45 28 35 41 43 56 37 38 50 52 33 44 37 72 47 20"),
  ("Luke", "80 52 38 44 39 49 50 56 62 42 54 59 35 35 32 31 37 43 48 47 38 71 56 53"),
  ("John", "51 25 36 54 47 71 53 59 41 42 57 50 38 31 27 33 26 40 42 31 25"),
  ("Acts", "26 47 26 37 42 15 60 40 43 48 30 25 52 28 41 40 34 28 41 38 40 30 35 27 27 32 44 31"),
  ("Rom", "32 29 31 25 21 23 25 39 33 21 36 21 14 23 33 27"),
  ("1Cor", "31 16 23 21 13 20 40 13 27 33 34 31 13 40 58 24"),
  ("2Cor", "24 17 18 18 21 18 16 24 15 18 33 21 14"),
  ("Gal", "24 21 29 31 26 18"),
  ("Eph", "23 22 21 32 33 24"),
  ("Phil", "30 30 21 23"),
  ("Col", "29 23 25 18"),
  ("1Thess", "10 20 13 18 28"),
  ("2Thess", "12 17 18"),
  ("1Tim", "20 15 16 16 25 21"),
  ("2Tim", "18 26 17 22"),
  ("Titus", "16 15 15"),
  ("Phlm", "25"),
  ("Heb", "14 18 19 16 14 20 28 13 28 39 40 29 25"),
  ("Jas", "27 26 18 17 20"),
  ("1Pet", "25 25 22 19 14"),
  ("2Pet", "21 22 18"),
  ("1John", "10 29 24 21 21"),
  ("2John", "13"),
  ("3John", "14"),
  ("Jude", "25"),
  ("Rev", "20 29 22 11 14 17 17 13 21 11 19 17 18 20 8 21 18 24 21 15 27 21"),
)
# NRSVA differs from KJV in the 66 books only by one more verse in these chapters.
_NRSVA_EXTRA_VERSES = {("3John", 1): 1, ("Rev", 12): 1}
# Elements dropped together with their content: notes (OSIS/ThML), ThML scripture references,
# speaker labels, GBF footnotes and titles, and non-canonical (section) titles; canonical titles
# such as psalm superscriptions are verse text and keep their content.
_DROPPED_ELEMENTS = re.compile(
  r"<note\b[^>]*(?<!/)>.*?</note>|<scripRef\b[^>]*(?<!/)>.*?</scripRef>"
  r"|<speaker\b[^>]*(?<!/)>.*?</speaker>|<RF>.*?<Rf>|<TS>.*?<Ts>"
  r"|<title\b(?![^>]*canonical=\"true\")[^>]*(?<!/)>.*?</title>",
  re.DOTALL,
)
# Word-level tags that sit inside running text; removing them must not split or join words.
_INLINE_TAGS = re.compile(
  r"</?(?:w|transChange|q|name|seg|hi|foreign|divineName|catchWord|rdg|reference|abbr|sync)"
  r"\b[^>]*>"
)
_ANY_TAG = re.compile(r"<[^>]*>")
# Back matter (WEB appends its glossary to Revelation 22:21) follows the end-of-book marker.
_BOOK_END = re.compile(r"<div\b(?=[^>]*\btype=\"book\")(?=[^>]*\beID=)[^>]*>")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([,.;:!?)])")


class VerseRef(NamedTuple):
  """A verse by OSIS book id, chapter and verse number."""

  book: str
  chapter: int
  verse: int


class VersePair(NamedTuple):
  """One verse in English (WEB) and Spanish (Reina-Valera 1909)."""

  book: str
  chapter: int
  verse: int
  en: str
  es: str


class SwordModule(NamedTuple):
  """A SWORD module read out of a ``.deb``.

  Attributes:
    name: module name from the ``.conf`` section header, e.g. ``"engWEB2015eb"``.
    conf: the ``.conf`` entries (the last value wins for repeated keys).
    files: the module's data files by base name, e.g. ``{"ot.bzs": b"...", ...}``.
  """

  name: str
  conf: dict[str, str]
  files: dict[str, bytes]


def fetch_deb(source: DebSource) -> pathlib.Path:
  """Returns the cached ``.deb`` of ``source``, downloading it with ``apt-get`` on first use.

  Args:
    source: the pinned package.

  Returns:
    Path of the checked ``.deb`` in the cache.

  Raises:
    SourceUnavailableError: when ``apt-get`` is missing or cannot download the package.
    ValueError: when the cached file does not match the pinned sha256.
  """
  directory = _fetch.cache_dir()
  deb = directory / source.deb_name
  if not deb.exists():
    how_to = (
      f"Download {source.pool_url} (sha256 {source.sha256}) on a machine with network "
      f"access and copy it into {directory}, or point ${_fetch.CACHE_ENV_VAR} at a directory "
      f"that holds it."
    )
    apt_get = shutil.which("apt-get")
    if apt_get is None:
      raise _fetch.SourceUnavailableError(
        f"apt-get is not available to fetch {source.package}. {how_to}"
      )
    command = [apt_get, "download", f"{source.package}={source.version}"]
    completed = subprocess.run(command, cwd=directory, capture_output=True, text=True, check=False)
    if completed.returncode != 0 or not deb.exists():
      raise _fetch.SourceUnavailableError(
        f"`{' '.join(command)}` exited with {completed.returncode}.\n"
        f"{completed.stderr.strip()}\n{how_to}"
      )
  _fetch.check_sha256(deb.read_bytes(), source.sha256, source.deb_name)
  return deb


def read_ar_members(archive: bytes) -> dict[str, bytes]:
  """Reads the members of a Unix ``ar`` archive (the container format of ``.deb`` files).

  Args:
    archive: the archive's bytes.

  Returns:
    Member contents by name.

  Raises:
    ValueError: when the bytes are not an ``ar`` archive.
  """
  if not archive.startswith(b"!<arch>\n"):
    raise ValueError("Not an ar archive (a .deb starts with '!<arch>').")
  members = {}
  position = 8
  while position + 60 <= len(archive):
    header = archive[position : position + 60]
    name = header[:16].decode("ascii").strip().rstrip("/")
    size = int(header[48:58].decode("ascii"))
    start = position + 60
    members[name] = archive[start : start + size]
    position = start + size + size % 2  # Members are aligned to even offsets.
  return members


def read_sword_module(deb: bytes) -> SwordModule:
  """Reads the one SWORD module a ``.deb`` installs under ``/usr/share/sword``.

  Args:
    deb: the ``.deb``'s bytes.

  Returns:
    The module's name, ``.conf`` entries and data files.

  Raises:
    ValueError: when the package holds no data tarball, no or several module ``.conf`` files,
      or a data tarball this Python cannot decompress (e.g. ``.zst`` before Python 3.14).
  """
  members = read_ar_members(deb)
  data_names = [name for name in members if name.startswith("data.tar")]
  if len(data_names) != 1:
    raise ValueError(f"Expected one data.tar.* member in the .deb, found {sorted(members)}.")
  try:
    with tarfile.open(fileobj=io.BytesIO(members[data_names[0]]), mode="r:*") as data:
      files = {
        member.name.removeprefix("./"): data.extractfile(member).read()
        for member in data.getmembers()
        if member.isfile() and member.name.removeprefix("./").startswith(_SWORD_ROOT)
      }
  except tarfile.ReadError as error:
    raise ValueError(
      f"Cannot decompress {data_names[0]} with this Python's tarfile (zstd needs Python 3.14); "
      f"unpack it with `dpkg-deb -x` and repack it as data.tar.xz."
    ) from error
  confs = [path for path in files if path.startswith(f"{_SWORD_ROOT}mods.d/")]
  if len(confs) != 1:
    raise ValueError(f"Expected one module .conf in the package, found {confs}.")
  name, conf = parse_conf(files[confs[0]].decode("utf-8"))
  data_path = _SWORD_ROOT + conf["DataPath"].removeprefix("./").rstrip("/") + "/"
  module_files = {
    path.removeprefix(data_path): content
    for path, content in files.items()
    if path.startswith(data_path)
  }
  return SwordModule(name, conf, module_files)


def parse_conf(text: str) -> tuple[str, dict[str, str]]:
  """Parses a SWORD module ``.conf``: a ``[Name]`` header, then ``Key=Value`` lines.

  Args:
    text: the file's text. Lines ending in a backslash continue on the next line.

  Returns:
    The module name and its entries; for repeated keys the last value wins.

  Raises:
    ValueError: when the ``[Name]`` header is missing.
  """
  name = None
  entries = {}
  key = None
  for line in text.splitlines():
    if key is not None:  # Continuation of the previous value.
      entries[key] += " " + line.strip().removesuffix("\\").rstrip()
      key = key if line.rstrip().endswith("\\") else None
    elif line.startswith("[") and line.rstrip().endswith("]") and name is None:
      name = line.strip()[1:-1]
    elif "=" in line and not line.lstrip().startswith("#"):
      entry_key, value = line.split("=", 1)
      entries[entry_key.strip()] = value.strip().removesuffix("\\").rstrip()
      key = entry_key.strip() if value.rstrip().endswith("\\") else None
  if name is None:
    raise ValueError("Module .conf has no [Name] header.")
  return name, entries


def testament_refs(versification: str) -> tuple[list[VerseRef | None], list[VerseRef | None]]:
  """Maps each verse index of the OT and NT files of a module to its verse.

  Args:
    versification: ``"KJV"`` or ``"NRSVA"`` (its deuterocanonical books are not listed; their
      indices follow Malachi's and are ignored).

  Returns:
    For the Old and the New Testament, the verse at each index, ``None`` for the module,
    testament, book and chapter headings.

  Raises:
    ValueError: for another versification.
  """
  if versification not in ("KJV", "NRSVA"):
    raise ValueError(f"Unsupported versification {versification!r}; expected KJV or NRSVA.")
  testaments = ([None, None], [None, None])  # Module and testament headings.
  for position, (book, verse_counts) in enumerate(_KJV_BOOKS):
    refs = testaments[position >= _OT_BOOKS]
    refs.append(None)  # Book heading.
    for chapter, count in enumerate(map(int, verse_counts.split()), start=1):
      if versification == "NRSVA":
        count += _NRSVA_EXTRA_VERSES.get((book, chapter), 0)
      refs.append(None)  # Chapter heading.
      refs.extend(VerseRef(book, chapter, verse) for verse in range(1, count + 1))
  return testaments


def read_ztext(
  files: Mapping[str, bytes], versification: str, encoding: str = "utf-8"
) -> dict[VerseRef, str]:
  """Reads the raw (marked-up) text of every verse of a zText module.

  Args:
    files: the module's files by base name (``ot.bzs``, ``ot.bzv``, ``ot.bzz``, ``nt.*``); a
      missing testament is skipped.
    versification: the module's ``Versification`` (``KJV`` or ``NRSVA``).
    encoding: the module's text encoding.

  Returns:
    Non-empty verse texts by reference, in canonical order.
  """
  verses = {}
  for testament, refs in zip(("ot", "nt"), testament_refs(versification), strict=True):
    if f"{testament}.bzv" not in files:
      continue
    blocks = list(struct.iter_unpack("<III", files[f"{testament}.bzs"]))
    compressed = files[f"{testament}.bzz"]
    index = files[f"{testament}.bzv"]
    decompressed: dict[int, bytes] = {}
    for position, ref in enumerate(refs):
      if ref is None or 10 * position + 10 > len(index):
        continue
      block, start, size = struct.unpack_from("<IIH", index, 10 * position)
      if size == 0:
        continue
      if block not in decompressed:
        offset, compressed_size, _ = blocks[block]
        decompressed[block] = zlib.decompress(compressed[offset : offset + compressed_size])
      # SWORD treats the text as a C string: anything after a NUL is not part of the verse.
      verses[ref] = decompressed[block][start : start + size].split(b"\0", 1)[0].decode(encoding)
  return verses


def clean_markup(text: str) -> str:
  """Turns OSIS, ThML or GBF verse markup into plain text.

  Args:
    text: raw verse text of a module.

  Returns:
    The verse's words: footnotes, cross references, section headings, speaker labels, Strong's
    numbers and all tags removed, entities decoded, whitespace collapsed to single spaces and
    no space left before closing punctuation.
  """
  book_end = _BOOK_END.search(text)
  if book_end:
    text = text[: book_end.start()]
  text = _DROPPED_ELEMENTS.sub(" ", text)
  text = _INLINE_TAGS.sub("", text)
  text = html.unescape(_ANY_TAG.sub(" ", text))
  return _SPACE_BEFORE_PUNCTUATION.sub(r"\1", " ".join(text.split()))


def module_verses(module: SwordModule) -> dict[VerseRef, str]:
  """Reads and cleans every verse of a zText module.

  Args:
    module: the module, whose ``.conf`` must declare ``ModDrv=zText`` and zlib compression.

  Returns:
    Plain verse texts by reference; verses empty after clean-up are left out.

  Raises:
    ValueError: for another module driver or compression.
  """
  driver = module.conf.get("ModDrv", "")
  compression = module.conf.get("CompressType", "ZIP")
  if driver.lower() != "ztext" or compression != "ZIP":
    raise ValueError(
      f"{module.name}: only zText modules with zlib (ZIP) compression are supported, got "
      f"ModDrv={driver} CompressType={compression}."
    )
  encoding = "utf-8" if module.conf.get("Encoding", "").upper() == "UTF-8" else "latin-1"
  raw = read_ztext(module.files, module.conf.get("Versification", "KJV"), encoding)
  cleaned = {ref: clean_markup(text) for ref, text in raw.items()}
  return {ref: text for ref, text in cleaned.items() if text}


def align_verses(
  english: Mapping[VerseRef, str],
  spanish: Mapping[VerseRef, str],
  skip_chapters: Iterable[tuple[str, int]] = (),
) -> list[VersePair]:
  """Pairs the verses present in both translations.

  Args:
    english: English verse texts by reference (empty verses left out).
    spanish: Spanish verse texts by reference (empty verses left out).
    skip_chapters: ``(book, chapter)`` pairs to leave out entirely.

  Returns:
    Pairs in the English text's order. A verse missing on one side is dropped together with the
    verse before it, which usually holds the missing verse's text in the other translation.
  """
  skip = set(skip_chapters)
  one_sided = set(english).symmetric_difference(spanish)
  return [
    VersePair(*ref, english[ref], spanish[ref])
    for ref in english
    if ref in spanish
    and (ref.book, ref.chapter) not in skip
    and VerseRef(ref.book, ref.chapter, ref.verse + 1) not in one_sided
  ]


def build_en_es_pairs(english: SwordModule, spanish: SwordModule) -> list[VersePair]:
  """Aligns the WEB and Reina-Valera modules verse by verse.

  Args:
    english: the ``engWEB2015eb`` module.
    spanish: the ``spaRV1909eb`` module.

  Returns:
    The aligned pairs in canonical order, without ``MISNUMBERED_CHAPTERS``.
  """
  return align_verses(module_verses(english), module_verses(spanish), MISNUMBERED_CHAPTERS)


def split_by_book(pairs: Iterable[VersePair]) -> dict[str, list[VersePair]]:
  """Splits pairs into ``SPLITS`` by book: ``VALIDATION_BOOKS``, ``TEST_BOOKS``, the rest.

  Args:
    pairs: verse pairs.

  Returns:
    ``{"train": [...], "validation": [...], "test": [...]}``, each in the input order.
  """
  splits: dict[str, list[VersePair]] = {name: [] for name in SPLITS}
  for pair in pairs:
    name = (
      "validation"
      if pair.book in VALIDATION_BOOKS
      else "test"
      if pair.book in TEST_BOOKS
      else "train"
    )
    splits[name].append(pair)
  return splits


def pairs_cache_path() -> pathlib.Path:
  """Returns where the aligned pairs of the pinned packages are cached as JSONL."""
  name = f"en_es_verses_web-{WEB_SOURCE.version}_sparv-{SPARV_SOURCE.version}_v{_PAIRS_FORMAT}"
  return _fetch.cache_dir() / f"{name}.jsonl"


def write_pairs(pairs: Iterable[VersePair], path: pathlib.Path) -> None:
  """Writes pairs as JSONL (one object per line), atomically.

  Args:
    pairs: the pairs to write.
    path: the destination file.
  """
  partial = path.with_name(path.name + ".partial")
  with partial.open("w", encoding="utf-8") as file:
    for pair in pairs:
      file.write(json.dumps(pair._asdict(), ensure_ascii=False) + "\n")
  partial.replace(path)  # Readers never see a half-written cache.


def read_pairs(path: pathlib.Path) -> list[VersePair]:
  """Reads pairs written by ``write_pairs``.

  Args:
    path: the JSONL file.

  Returns:
    The pairs in file order.
  """
  with path.open(encoding="utf-8") as file:
    return [VersePair(**json.loads(line)) for line in file if line.strip()]


def load_en_es_verses() -> dict[str, list[VersePair]]:
  """Loads the English→Spanish verse pairs, building and caching them on first use.

  The first call fetches the two pinned ``.deb`` files (``apt-get download``), parses and
  aligns the modules and writes the JSONL cache; later calls only read the cache.

  Returns:
    ``{"train": [...], "validation": [...], "test": [...]}`` split by book.

  Raises:
    SourceUnavailableError: when a ``.deb`` is not cached and cannot be fetched.
  """
  path = pairs_cache_path()
  if not path.exists():
    english = read_sword_module(fetch_deb(WEB_SOURCE).read_bytes())
    spanish = read_sword_module(fetch_deb(SPARV_SOURCE).read_bytes())
    write_pairs(build_en_es_pairs(english, spanish), path)
  return split_by_book(read_pairs(path))
