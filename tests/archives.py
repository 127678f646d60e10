"""Builds in-memory archives for the fixtures of the demo's data tests."""

from __future__ import annotations

import io
import tarfile


def tar_bytes(members: dict[str, bytes], compression: str) -> bytes:
  """A tar archive of ``members`` (name → content), compressed by ``"gz"`` or ``"xz"``."""
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode=f"w:{compression}") as archive:
    for name, content in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(content)
      archive.addfile(info, io.BytesIO(content))
  return buffer.getvalue()
