"""Tests of the English→Spanish verse data: zText parsing on a generated module, markup clean-up,
alignment, the split by book, the JSONL cache, the metrics, and the real Debian packages."""

import struct
import zlib

import pytest

from dst_optax.demo import _fetch, _metrics, _verses
from dst_optax.demo._verses import VersePair, VerseRef
from tests import archives

_CONF = """## Test module
[TestBible]
DataPath=./modules/texts/ztext/testbible/
ModDrv=zText
SourceType=OSIS
Encoding=UTF-8
CompressType=ZIP
BlockType=BOOK
Versification={versification}
About=A test module \\
  spread over two lines.
"""
# Raw verses with the kinds of markup the real modules carry, and their expected plain text.
_FIXTURE = {
  VerseRef("Gen", 1, 1): (
    '<w lemma="strong:H7225">In</w> <w lemma="strong:H7225">the beginning</w>, '
    '<w lemma="strong:H0430">God</w><note placement="foot"><reference type="annotateRef">1:1 '
    "</reference>Hebrew: Elohim.</note><w>created</w> the heavens.",
    "In the beginning, God created the heavens.",
  ),
  VerseRef("Gen", 1, 2): (
    '<title type="section">The Earth</title><l level="1" sID="a"/>The earth was'
    '<l eID="a"/><l level="2" sID="b"/>empty <transChange type="added">and</transChange> '
    'dark .<l eID="b"/>',
    "The earth was empty and dark.",
  ),
  VerseRef("Gen", 2, 4): ("Ésta &amp; aquélla,  ¿verdad?", "Ésta & aquélla, ¿verdad?"),
  VerseRef("John", 3, 16): (
    '<title canonical="true" type="psalm">A title.</title> For God so loved the world'
    '<note type="crossReference"><reference osisRef="Rom.5.8">Rom 5:8</reference></note>.'
    '<div eID="x" type="book"/> <div sID="g" type="glossary"/>Glossary text.',
    "A title. For God so loved the world.",
  ),
  VerseRef("John", 21, 25): ("<speaker>Narrator</speaker>The end.", "The end."),
}


def _write_ztext(verses: dict[VerseRef, str], versification: str) -> dict[str, bytes]:
  """Writes a zText module, one zlib block per book, as SWORD lays it out."""
  files = {}
  for testament, refs in zip(("ot", "nt"), _verses.testament_refs(versification), strict=True):
    index = [(0, 0, 0)] * len(refs)
    blocks: dict[str, bytearray] = {}
    block_numbers: dict[str, int] = {}
    for position, ref in enumerate(refs):
      if ref is None or ref not in verses:
        continue
      block = blocks.setdefault(ref.book, bytearray())
      number = block_numbers.setdefault(ref.book, len(block_numbers))
      text = verses[ref].encode()
      index[position] = (number, len(block), len(text))
      block += text
    compressed = b""
    block_index = b""
    for block in blocks.values():
      data = zlib.compress(bytes(block))
      block_index += struct.pack("<III", len(compressed), len(data), len(block))
      compressed += data
    files[f"{testament}.bzs"] = block_index
    files[f"{testament}.bzv"] = b"".join(struct.pack("<IIH", *entry) for entry in index)
    files[f"{testament}.bzz"] = compressed
  return files


def _ar(members: dict[str, bytes]) -> bytes:
  archive = b"!<arch>\n"
  for name, content in members.items():
    header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(content):<10}`\n"
    archive += header.encode() + content + b"\n" * (len(content) % 2)
  return archive


def _fake_deb(versification: str = "KJV") -> bytes:
  raw = {ref: markup for ref, (markup, _) in _FIXTURE.items()}
  data = {"./usr/share/sword/mods.d/testbible.conf": _CONF.format(versification=versification)}
  data = {name: text.encode() for name, text in data.items()}
  for name, content in _write_ztext(raw, versification).items():
    data[f"./usr/share/sword/modules/texts/ztext/testbible/{name}"] = content
  data["./usr/share/doc/sword-text-test/copyright"] = b"Public domain."
  return _ar(
    {
      "debian-binary": b"2.0\n",
      "control.tar.xz": archives.tar_bytes({"./control": b"Package: sword-text-test\n"}, "xz"),
      "data.tar.xz": archives.tar_bytes(data, "xz"),
    }
  )


def test_versification_layout_matches_the_real_index_sizes():
  # Sizes of the real .bzv files / 10 bytes per entry: KJV (spaRV1909eb) OT 24,115 and NT 8,246
  # entries; NRSVA (engWEB2015eb) NT 8,248, two more verses (3 John 1:15, Revelation 12:18).
  kjv_ot, kjv_nt = _verses.testament_refs("KJV")
  nrsva_ot, nrsva_nt = _verses.testament_refs("NRSVA")
  assert (len(kjv_ot), len(kjv_nt), len(nrsva_ot), len(nrsva_nt)) == (24115, 8246, 24115, 8248)
  assert sum(ref is not None for ref in kjv_ot + kjv_nt) == 31102
  # 0 module heading, 1 testament heading, 2 book heading, 3 chapter heading, 4 first verse.
  assert kjv_ot[:5] == [None, None, None, None, VerseRef("Gen", 1, 1)]
  assert kjv_nt[4] == VerseRef("Matt", 1, 1)
  assert kjv_ot[-1] == VerseRef("Mal", 4, 6) and kjv_nt[-1] == VerseRef("Rev", 22, 21)
  assert VerseRef("3John", 1, 15) in nrsva_nt and VerseRef("3John", 1, 15) not in kjv_nt
  with pytest.raises(ValueError, match="Unsupported versification"):
    _verses.testament_refs("Vulg")


@pytest.mark.parametrize("versification", ["KJV", "NRSVA"])
def test_read_ztext_round_trips_a_generated_module(versification):
  raw = {ref: markup for ref, (markup, _) in _FIXTURE.items()}
  files = _write_ztext(raw, versification)
  assert _verses.read_ztext(files, versification) == raw
  # A module with the New Testament only is read too.
  nt_only = {name: content for name, content in files.items() if name.startswith("nt.")}
  assert list(_verses.read_ztext(nt_only, versification)) == [
    VerseRef("John", 3, 16),
    VerseRef("John", 21, 25),
  ]


def test_read_sword_module_from_a_deb():
  module = _verses.read_sword_module(_fake_deb())
  assert module.name == "TestBible"
  assert module.conf["ModDrv"] == "zText" and module.conf["Versification"] == "KJV"
  assert module.conf["About"] == "A test module spread over two lines."
  assert sorted(module.files) == ["nt.bzs", "nt.bzv", "nt.bzz", "ot.bzs", "ot.bzv", "ot.bzz"]
  assert _verses.module_verses(module) == {ref: text for ref, (_, text) in _FIXTURE.items()}


def test_read_sword_module_rejects_other_archives():
  with pytest.raises(ValueError, match="Not an ar archive"):
    _verses.read_sword_module(b"PK\x03\x04")
  with pytest.raises(ValueError, match=r"one data\.tar"):
    _verses.read_sword_module(_ar({"debian-binary": b"2.0\n"}))
  broken = _ar({"debian-binary": b"2.0\n", "data.tar.zst": b"(\xb5/\xfd not a tarball"})
  with pytest.raises(ValueError, match="Cannot decompress data.tar.zst"):
    _verses.read_sword_module(broken)


def test_module_verses_rejects_other_drivers():
  module = _verses.read_sword_module(_fake_deb())
  raw_text = module._replace(conf={**module.conf, "ModDrv": "RawText"})
  with pytest.raises(ValueError, match="only zText"):
    _verses.module_verses(raw_text)


def test_parse_conf_requires_a_name():
  with pytest.raises(ValueError, match="no \\[Name\\]"):
    _verses.parse_conf("ModDrv=zText\n")
  name, conf = _verses.parse_conf(
    "# comment\n[KJV]\nLang=en\nGlobalOptionFilter=A\nGlobalOptionFilter=B\n"
  )
  assert (name, conf) == ("KJV", {"Lang": "en", "GlobalOptionFilter": "B"})


@pytest.mark.parametrize(
  ("markup", "expected"),
  [
    # OSIS: Strong's tags keep their words, footnotes go, no space is left before punctuation.
    ('<w lemma="strong:G2316">God</w>, <w lemma="strong:G25">loved</w>', "God, loved"),
    ("only born<note>Or, only</note>Son", "only born Son"),
    ('<title type="main">Heading</title>Text<title type="x-preverse"/>', "Text"),
    # ThML: scripture references, notes and Strong's sync tags.
    ('Word<sync type="Strongs" value="G3056"/> <scripRef>John 1:1</scripRef>end', "Word end"),
    ("Light<note>n</note>.", "Light."),
    # GBF: Strong's numbers, footnotes, section titles and formatting tags.
    (
      "<TS>Title<Ts>In the beginning<WH7225> God<WH430><RF>note<Rf> <FI>made<Fi> it",
      "In the beginning God made it",
    ),
    ("  \n\t", ""),
  ],
)
def test_clean_markup(markup, expected):
  assert _verses.clean_markup(markup) == expected


def test_align_drops_one_sided_verses_their_neighbours_and_skipped_chapters():
  english = {
    VerseRef("Gen", 1, 1): "a",
    VerseRef("Gen", 1, 2): "b",
    VerseRef("Gen", 1, 3): "c",
    VerseRef("Gen", 2, 1): "d",
    VerseRef("Exod", 1, 1): "e",
  }
  # Spanish merged 1:3 into 1:2, so 1:2 is no translation of the English 1:2.
  spanish = {ref: text.upper() for ref, text in english.items() if ref != VerseRef("Gen", 1, 3)}
  pairs = _verses.align_verses(english, spanish, skip_chapters=[("Exod", 1)])
  assert pairs == [VersePair("Gen", 1, 1, "a", "A"), VersePair("Gen", 2, 1, "d", "D")]


def _pairs(books: list[str]) -> list[VersePair]:
  return [
    VersePair(book, 1, verse, f"{book} {verse}", f"es {verse}")
    for book in books
    for verse in (1, 2)
  ]


def test_split_by_book_is_deterministic_and_disjoint():
  assert not set(_verses.VALIDATION_BOOKS) & set(_verses.TEST_BOOKS)
  pairs = _pairs(["Gen", "Ruth", "Mark", "Jas", "Eccl", "John"])
  splits = _verses.split_by_book(pairs)
  assert splits == _verses.split_by_book(list(pairs))
  books = {name: {pair.book for pair in split} for name, split in splits.items()}
  assert books == {
    "train": {"Gen", "John"},
    "validation": {"Ruth", "Jas"},
    "test": {"Mark", "Eccl"},
  }
  assert sum(len(split) for split in splits.values()) == len(pairs)


def test_load_reads_the_jsonl_cache(tmp_path, monkeypatch):
  monkeypatch.setenv(_fetch.CACHE_ENV_VAR, str(tmp_path))
  pairs = _pairs(["Gen", "Ruth", "Mark"])
  pairs[0] = pairs[0]._replace(en="“Quoted” ñ, á")
  _verses.write_pairs(pairs, _verses.pairs_cache_path())
  assert _verses.read_pairs(_verses.pairs_cache_path()) == pairs
  # No .deb is in the cache: loading must not try to fetch one.
  splits = _verses.load_en_es_verses()
  assert splits["train"] == pairs[:2] and splits["validation"] == pairs[2:4]
  assert splits["test"] == pairs[4:]


def test_fetch_without_apt_get_explains_how_to_provide_the_deb(tmp_path, monkeypatch):
  monkeypatch.setenv(_fetch.CACHE_ENV_VAR, str(tmp_path))
  monkeypatch.setattr(_verses.shutil, "which", lambda _: None)
  with pytest.raises(_fetch.SourceUnavailableError, match="pool/main/s/sword-text-web/"):
    _verses.fetch_deb(_verses.WEB_SOURCE)


def test_fetch_checks_the_cached_deb(tmp_path, monkeypatch):
  monkeypatch.setenv(_fetch.CACHE_ENV_VAR, str(tmp_path))
  (tmp_path / _verses.SPARV_SOURCE.deb_name).write_bytes(b"not the package")
  with pytest.raises(ValueError, match="does not match the pinned"):
    _verses.fetch_deb(_verses.SPARV_SOURCE)


def test_translation_scores_on_known_strings():
  perfect = _metrics.translation_scores(["a b c d", "x y"], ["a b c d", "x y"])
  assert perfect == pytest.approx({"bleu": 100.0, "chrf": 100.0})
  # 1- to 4-gram precisions 5/6, 3/5, 2/4, 1/3 and no brevity penalty: BLEU = (1/12)^(1/4).
  scores = _metrics.translation_scores(["the cat sat on the mat"], ["the cat sat on a mat"])
  assert scores["bleu"] == pytest.approx(100 * (1 / 12) ** 0.25)
  assert scores["chrf"] == pytest.approx(72.0848, abs=1e-3)
  unrelated = _metrics.translation_scores(["hola"], ["adiós"])
  assert unrelated["bleu"] == 0.0 and unrelated["chrf"] == pytest.approx(5.2083, abs=1e-3)
  with pytest.raises(ValueError, match="as many hypotheses"):
    _metrics.translation_scores(["a"], ["a", "b"])


def test_real_packages():
  try:
    english = _verses.read_sword_module(_verses.fetch_deb(_verses.WEB_SOURCE).read_bytes())
    spanish = _verses.read_sword_module(_verses.fetch_deb(_verses.SPARV_SOURCE).read_bytes())
  except _fetch.SourceUnavailableError as error:
    pytest.skip(f"The SWORD .deb files cannot be fetched here: {error}")
  assert (english.name, spanish.name) == ("engWEB2015eb", "spaRV1909eb")
  pairs = _verses.build_en_es_pairs(english, spanish)
  assert len(pairs) == 30811
  by_ref = {VerseRef(*pair[:3]): pair for pair in pairs}
  john = by_ref[VerseRef("John", 3, 16)]
  assert john.en == (
    "For God so loved the world, that he gave his only born Son, that whoever believes in him "
    "should not perish, but have eternal life."
  )
  assert john.es.startswith("Porque de tal manera amó Dios al mundo, que ha dado á su Hijo")
  assert (
    by_ref[VerseRef("Gen", 1, 1)].en == "In the beginning, God created the heavens and the earth."
  )
  assert by_ref[VerseRef("Gen", 1, 1)].es == "EN el principio crió Dios los cielos y la tierra."
  # The WEB's glossary after Revelation 22:21 is cut; psalm titles are verse text on both sides.
  assert by_ref[VerseRef("Rev", 22, 21)].en.endswith("with all the saints. Amen.")
  assert by_ref[VerseRef("Ps", 3, 1)].es.startswith("Salmo de David")
  assert by_ref[VerseRef("Ps", 3, 1)].en.startswith("A Psalm by David")
  assert not any((pair.book, pair.chapter) in _verses.MISNUMBERED_CHAPTERS for pair in pairs)
  assert all(pair.en and pair.es and "<" not in pair.en + pair.es for pair in pairs)
  splits = _verses.load_en_es_verses()
  assert {name: len(split) for name, split in splits.items()} == {
    "train": 29269,
    "validation": 537,
    "test": 1005,
  }
  assert sorted(pair for split in splits.values() for pair in split) == sorted(pairs)
