"""Where each dataset's raw files live and how to read them.

A file is looked for, in order: unpacked under the manual dir (the layout of
the staged data folder), as the original archive in the manual dir, as an
earlier download in `<data_dir>/downloads`, and finally downloaded from its
pinned URL (sha256 checked). Offline, a missing file is a `DataError` that says
exactly where to put it.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from typing import Any

from recattn.data import parsing
from recattn.data.dataset import DataError

_GROUPLENS = "https://files.grouplens.org/datasets/movielens"
_SASREC = ("https://raw.githubusercontent.com/kang205/SASRec/"
           "e3738967fddab206d6eeb4fda433e7a7034dd8b1/data")
_S3REC = ("https://raw.githubusercontent.com/aHuiWang/CIKM2020-S3Rec/"
          "49a890dcb516c9ed3126564495234ea74d5cd566/data")
_DOWNLOAD_TIMEOUT_S = 30


@dataclasses.dataclass(frozen=True)
class RawFile:
  """One raw file and the places it may come from.

  Attributes:
    path: Location relative to the manual dir, e.g. "ml-1m/ratings.dat".
    archive: Zip relative to the manual dir that holds the file, or None.
    url: Pinned download URL (of the archive when there is one), or None.
    sha256: Expected sha256 of what `url` serves.
  """

  path: str
  archive: str | None = None
  url: str | None = None
  sha256: str | None = None

  @property
  def member(self) -> str:
    """Name of the file inside `archive` (GroupLens zips: "ml-1m/...")."""
    return self.path


@dataclasses.dataclass(frozen=True)
class Source:
  """A raw dataset: its interaction file and how to parse it.

  Attributes:
    interactions: The interaction file.
    parse: Its parser, `(content, display path) -> RawInteractions`.
    attributes: The item-attribute file, or None (no `item_features`).
    parse_attributes: Its parser, `(content, display path) -> {original
      item id: [attribute id, ...]}`.
  """

  interactions: RawFile
  parse: Callable[[bytes, str], parsing.RawInteractions]
  attributes: RawFile | None = None
  parse_attributes: Callable[[bytes, str], dict[int, list[int]]] = (
      parsing.parse_item2attributes)


def _grouplens(path: str, archive: str, sha256: str, movies: str | None = None,
               **kwargs) -> Source:
  def parse(data: bytes, where: str) -> parsing.RawInteractions:
    return parsing.parse_ratings(data, where, **kwargs)
  url = f"{_GROUPLENS}/{archive}"
  source = Source(RawFile(path, archive, url, sha256), parse)
  if movies:  # `movies` in the same archive: genres and release years.
    source = dataclasses.replace(
        source, attributes=RawFile(movies, archive, url, sha256),
        parse_attributes=parsing.parse_movielens_movies)
  return source


# ML-1M's movies.dat (genres, release year): the item attributes of every
# dataset with ML-1M's movie ids.
_ML1M_MOVIES = _grouplens(
    "ml-1m/ratings.dat", "ml-1m.zip",
    "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
    movies="ml-1m/movies.dat", sep=b"::")


def _s3rec(stem: str, sha256: str, attributes_sha256: str) -> Source:
  return Source(
      RawFile(f"amazon-s3rec/{stem}.txt", None, f"{_S3REC}/{stem}.txt", sha256),
      parsing.parse_user_lines,
      attributes=RawFile(
          f"amazon-s3rec/{stem}_item2attributes.json", None,
          f"{_S3REC}/{stem}_item2attributes.json", attributes_sha256),
  )


# sha256 of the GroupLens zips as pinned in tensorflow_datasets'
# url_checksums/movielens.txt; of the text files as in the staged README.
SOURCES: dict[str, Source] = {
    "ml-1m": _ML1M_MOVIES,
    "ml-100k": _grouplens(
        "ml-100k/u.data", "ml-100k.zip",
        "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        sep=b"\t"),
    "ml-20m": _grouplens(
        "ml-20m/ratings.csv", "ml-20m.zip",
        "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
        sep=b",", header=b"userId,movieId,rating,timestamp"),
    "ml-1m-partial": dataclasses.replace(
        _ML1M_MOVIES,
        interactions=RawFile("ml-1m-ratings-partial/ratings.dat.gz"),
        parse=lambda data, where: parsing.parse_ratings(data, where,
                                                        sep=b"::")),
    "ml-1m-seq": dataclasses.replace(
        _ML1M_MOVIES,
        interactions=RawFile("ml-1m-bert4rec-preprocessed/ml-1m.seq.txt"),
        parse=parsing.parse_pairs),
    "video": Source(
        RawFile(
            "sasrec/Video.txt", None, f"{_SASREC}/Video.txt",
            "b7376fe24430743f411dc7f567285657b2adb3f74361cc7ba0aee94f3024b651"),
        parsing.parse_pairs),
    "beauty": _s3rec(
        "Beauty",
        "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8",
        "129e40f67486f6877eff0f5318cfa8530ee8ac23d8b0d1de04e1bb7a2ba0b2d4"),
    "sports": _s3rec(
        "Sports_and_Outdoors",
        "2a095e0648872beb9982408958290f5d655db5be2911c3756b5446de9f0b8de2",
        "7fb10733ac4f1811384a52144cdefa7fcc7536fa80a7232c5da9bd789155c34b"),
    "toys": _s3rec(
        "Toys_and_Games",
        "176c680c688d497598c4a89a03b402c0fe78d795e5db335c2e78dd5f2d778a3f",
        "d371acd25101eedac04afc727626464b7acec770c4eda708705d51eb76eb1ad0"),
}


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _download(url: str, sha256: str, target: str) -> None:
  """Downloads `url` to `target` atomically; raises OSError/ValueError."""
  os.makedirs(os.path.dirname(target), exist_ok=True)
  with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
    data = response.read()
  if _sha256(data) != sha256:
    raise ValueError(f"sha256 {_sha256(data)} != pinned {sha256}")
  partial = f"{target}.incomplete"
  with open(partial, "wb") as f:
    f.write(data)
  os.replace(partial, target)


def _open(on_disk: str,
          member: str | None) -> tuple[bytes, str, dict[str, Any]]:
  """Reads a file (or a zip member); returns (content, display path, record)."""
  with open(on_disk, "rb") as f:
    blob = f.read()
  record = {"path": on_disk, "bytes": len(blob), "sha256": _sha256(blob)}
  where = on_disk
  if member is not None:
    where = f"{on_disk}/{member}"
    record["member"] = member
    try:
      with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        blob = archive.read(member)
    except (zipfile.BadZipFile, KeyError) as e:
      raise DataError(f"{on_disk}: cannot read {member} from zip: {e}") from e
  if on_disk.endswith(".gz"):
    try:
      blob = gzip.decompress(blob)
    except (OSError, EOFError) as e:
      raise DataError(f"{on_disk}: not a valid gzip file ({e})") from e
  return blob, where, record


def fetch(
    file: RawFile, *, name: str, manual_dir: str, download_dir: str,
    download: bool,
) -> tuple[bytes, str, dict[str, Any]]:
  """Finds or downloads `file`; returns (content, display path, record).

  Args:
    file: The file wanted.
    name: Dataset name, for error messages.
    manual_dir: Folder with manually placed files, or "" for none.
    download_dir: Where downloads are kept.
    download: Whether to try the network when the file is not found.

  Raises:
    DataError: naming where to put the file when it cannot be found.
  """
  candidates = []
  if manual_dir:
    candidates.append((os.path.join(manual_dir, file.path), None))
    if file.archive:
      candidates.append((os.path.join(manual_dir, file.archive), file.member))
  if file.url:
    downloaded = os.path.join(download_dir, os.path.basename(file.url))
    candidates.append((downloaded, file.member if file.archive else None))
  for on_disk, member in candidates:
    if os.path.isfile(on_disk):
      return _open(on_disk, member)

  where = manual_dir or "<manual_dir>"
  wanted = f"put {file.path} at {os.path.join(where, file.path)}"
  if file.archive:
    wanted += f" (or {file.archive} at {os.path.join(where, file.archive)})"
  if not manual_dir:
    wanted += " and set data.manual_dir or RECATTN_MANUAL_DIR"
  if file.url and download:
    try:
      _download(file.url, file.sha256, downloaded)
    except (OSError, ValueError, urllib.error.URLError) as e:
      reason = str(e).replace("\n", " ")
      raise DataError(f"{name}: download of {file.url} failed ({reason}); "
                      f"{wanted}") from e
    return _open(downloaded, file.member if file.archive else None)
  raise DataError(f"{name}: raw file not found; {wanted}")


def read_interactions(
    name: str, *, manual_dir: str, download_dir: str, download: bool
) -> tuple[parsing.RawInteractions, list[dict[str, Any]]]:
  """Reads and parses dataset `name`'s raw interactions.

  Returns:
    The interactions, and one record (path, bytes, sha256) per file read.
  """
  source = SOURCES[name]
  data, where, record = fetch(
      source.interactions, name=name, manual_dir=manual_dir,
      download_dir=download_dir, download=download)
  return source.parse(data, where), [record]


def attribute_datasets() -> tuple[str, ...]:
  """Names of the datasets with an item-attribute file."""
  return tuple(sorted(k for k, s in SOURCES.items() if s.attributes))


def read_item_attributes(
    name: str, *, manual_dir: str, download_dir: str, download: bool
) -> tuple[dict[int, list[int]], dict[str, Any]]:
  """Reads dataset `name`'s item attributes as {item: [attr, ...]}.

  Original item ids; attribute ids from 0 (S3-Rec's own ids, or MovieLens's
  genres and release decade, `parsing.parse_movielens_movies`).
  """
  source = SOURCES[name]
  if source.attributes is None:
    raise DataError(f"data.name={name!r} has no item attributes; allowed: "
                    f"{', '.join(attribute_datasets())}")
  data, where, record = fetch(
      source.attributes, name=name, manual_dir=manual_dir,
      download_dir=download_dir, download=download)
  return source.parse_attributes(data, where), record
