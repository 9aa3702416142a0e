"""Strict, vectorised parsers for the raw interaction text formats.

Each parser takes the file's bytes and returns numpy arrays. Parsing is done on
whole byte buffers with numpy (ML-1M's 1M lines take ~0.1 s) rather than line
by line in Python, but it stays strict: the structure of every line (field
count, empty fields, stray characters, number length) is checked with
vectorised masks first, and the first offending line is reported as a
`DataError("<path>:<line>: <what is wrong>")`. If the final numeric conversion
still fails (e.g. "3..5"), a slow per-line scan finds the line to name.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Sequence
from typing import NoReturn

import numpy as np

from recattn.data.dataset import DataError

# Large files (ML-20M is ~530 MB of text) are processed in pieces so the
# per-byte masks and positions stay a few hundred MB at most.
_CHUNK_BYTES = 64 << 20
# Stand-in for multi-byte separators ("::"); any raw occurrence is rejected.
_SEP_STANDIN = b"\x1f"
# Longer digit strings would overflow int64 (or lose float64 precision) and
# numpy would saturate silently.
_MAX_INT_DIGITS = 18
_MAX_FLOAT_CHARS = 15


@dataclasses.dataclass(frozen=True)
class RawInteractions:
  """Interactions as read from a source, original ids, file order.

  Attributes:
    users: [N] int64 original user ids.
    items: [N] int64 original item ids.
    ratings: [N] float32 explicit ratings, or None for implicit sources.
    timestamps: [N] int64 unix seconds, or None when the source has none.
  """

  users: np.ndarray
  items: np.ndarray
  ratings: np.ndarray | None = None
  timestamps: np.ndarray | None = None


def _line_text(chunk: bytes, index: int) -> str:
  """Returns line `index` of `chunk` for an error message (error path only)."""
  line = chunk.split(b"\n")[index]
  text = line.replace(_SEP_STANDIN, b"::").decode("latin-1")
  return repr(text if len(text) <= 80 else text[:77] + "...")


def _fail(path: str, chunk: bytes, first_line: int, index: int,
          what: str) -> NoReturn:
  raise DataError(
      f"{path}:{first_line + index}: {what}: {_line_text(chunk, index)}"
  )


def _chunks(body: bytes, size: int) -> Iterator[tuple[int, bytes]]:
  """Yields (0-based line number of the chunk's first line, chunk)."""
  start, line = 0, 0
  while start < len(body):
    end = body.find(b"\n", start + size)
    end = len(body) if end < 0 else end
    chunk = body[start:end]
    yield line, chunk
    line += chunk.count(b"\n") + 1
    start = end + 1


def _slow_scan(path: str, chunk: bytes, text: bytes, first_line: int,
               float_fields: frozenset[int]) -> NoReturn:
  """Finds the first line Python cannot convert; used only after a failure."""
  for index, line in enumerate(text.split(b"\n")):
    for field, token in enumerate(line.split(b" ")):
      try:
        float(token) if field in float_fields else int(token)
      except ValueError:
        _fail(path, chunk, first_line, index,
              f"field {field + 1} is not a number")
  raise DataError(f"{path}:{first_line}: could not parse numbers in file")


def _parse_chunk(
    chunk: bytes,
    path: str,
    first_line: int,
    sep: int,
    num_fields: int | None,
    float_fields: frozenset[int],
    is_last: bool,
) -> tuple[np.ndarray, np.ndarray]:
  """Parses one newline-aligned chunk; returns (values, fields_per_line)."""
  arr = np.frombuffer(chunk, np.uint8)
  allowed = np.zeros(256, bool)
  allowed[np.frombuffer(b"0123456789\n", np.uint8)] = True
  allowed[sep] = True
  if float_fields:
    allowed[ord(".")] = True
  bad = np.flatnonzero(~allowed[arr])
  if bad.size:
    pos = int(bad[0])
    char = chunk[pos:pos + 1]
    what = ("negative number" if char == b"-" else
            f"unexpected character {char.decode('latin-1')!r}")
    _fail(path, chunk, first_line, chunk.count(b"\n", 0, pos), what)

  # Every field ends at a separator or a newline; merged in one sorted pass.
  delims = np.flatnonzero((arr == 10) | (arr == sep))
  is_newline = arr[delims] == 10
  newlines = delims[is_newline]
  num_lines = newlines.size + 1
  # Fields per line: delimiters up to and including each line's end.
  line_ends = np.searchsorted(delims, np.append(newlines, arr.size))
  fields_per_line = np.diff(line_ends, prepend=-1)

  bounds = np.concatenate([[-1], delims, [arr.size]])
  widths = np.diff(bounds) - 1
  limit = _MAX_FLOAT_CHARS if float_fields else _MAX_INT_DIGITS
  odd = np.flatnonzero((widths == 0) | (widths > limit))
  if odd.size:
    field = int(odd[0])
    index = int(np.searchsorted(newlines, bounds[field + 1]))
    if widths[field] > limit:
      what = f"number longer than {limit} characters"
    elif fields_per_line[index] == 1:
      what = "empty line"
    else:
      what = "empty field (doubled or trailing separator)"
    _fail(path, chunk, first_line, index, what)

  if num_fields is not None:
    wrong = np.flatnonzero(fields_per_line != num_fields)
    if wrong.size:
      index = int(wrong[0])
      got = int(fields_per_line[index])
      truncated = is_last and index == num_lines - 1 and got < num_fields
      _fail(path, chunk, first_line, index,
            f"expected {num_fields} fields, got {got}"
            + (" (file truncated?)" if truncated else ""))
  else:
    lonely = np.flatnonzero(fields_per_line < 2)
    if lonely.size:
      _fail(path, chunk, first_line, int(lonely[0]),
            "user has no items (empty sequence)")

  if float_fields:
    dots = np.flatnonzero(arr == ord("."))
    if dots.size:
      line = np.searchsorted(newlines, dots)
      line_starts = np.concatenate([[0], line_ends[:-1] + 1])
      field = np.searchsorted(delims, dots) - line_starts[line]
      not_float = np.flatnonzero(~np.isin(field, list(float_fields)))
      if not_float.size:
        k = int(not_float[0])
        _fail(path, chunk, first_line, int(line[k]),
              f"field {field[k] + 1} must be an integer")

  dtype = np.float64 if float_fields else np.int64
  text = chunk.replace(bytes([sep]), b" ") if sep != ord(" ") else chunk
  try:
    values = np.fromstring(text, dtype=dtype, sep=" ")
  except ValueError:
    values = None
  if values is None or values.size != int(fields_per_line.sum()):
    _slow_scan(path, chunk, text, first_line, float_fields)
  return values, fields_per_line


def parse_table(
    data: bytes,
    path: str,
    *,
    sep: bytes,
    num_fields: int | None,
    float_fields: Sequence[int] = (),
    header: bytes | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Parses separated non-negative numbers, strictly.

  Args:
    data: The whole file's bytes.
    path: File name used in error messages.
    sep: Field separator, e.g. b"::", b"\t", b",", b" ".
    num_fields: Exact fields per line, or None for variable-length lines of at
      least two fields (S3-Rec: `user item item ...`).
    float_fields: 0-based fields that may hold a decimal point (ratings).
    header: Exact first line expected (CSV header), skipped after checking.

  Returns:
    values: [total_fields] float64 if `float_fields` else int64, row-major.
    fields_per_line: [num_lines] int64.

  Raises:
    DataError: "<path>:<line>: <what>" for the first bad line.
  """
  data = data.replace(b"\r\n", b"\n")
  if not data.strip():
    raise DataError(f"{path}:1: empty file")
  first_line = 1
  if header is not None:
    head, _, data = data.partition(b"\n")
    if head != header:
      raise DataError(
          f"{path}:1: expected header {header.decode()!r}, got "
          f"{head[:80].decode('latin-1')!r}")
    first_line = 2
    if not data.strip():
      raise DataError(f"{path}:2: no data after the header")
  # One final newline is the norm; anything more is an empty line, reported.
  body = data[:-1] if data.endswith(b"\n") else data
  if len(sep) > 1:
    if _SEP_STANDIN in body:
      line = first_line + body.count(b"\n", 0, body.index(_SEP_STANDIN))
      raise DataError(f"{path}:{line}: unexpected control character")
    body = body.replace(sep, _SEP_STANDIN)
    sep_byte = _SEP_STANDIN[0]
  else:
    sep_byte = sep[0]

  all_values, all_counts = [], []
  pieces = list(_chunks(body, _CHUNK_BYTES))
  for i, (line0, chunk) in enumerate(pieces):
    values, counts = _parse_chunk(
        chunk, path, first_line + line0, sep_byte, num_fields,
        frozenset(float_fields), is_last=i == len(pieces) - 1)
    all_values.append(values)
    all_counts.append(counts)
  return np.concatenate(all_values), np.concatenate(all_counts)


def parse_ratings(
    data: bytes, path: str, *, sep: bytes, header: bytes | None = None
) -> RawInteractions:
  """Parses `user<sep>item<sep>rating<sep>timestamp` lines (MovieLens)."""
  values, _ = parse_table(
      data, path, sep=sep, num_fields=4, float_fields=(2,), header=header)
  table = values.reshape(-1, 4)
  return RawInteractions(
      users=table[:, 0].astype(np.int64),
      items=table[:, 1].astype(np.int64),
      ratings=table[:, 2].astype(np.float32),
      timestamps=table[:, 3].astype(np.int64),
  )


def parse_pairs(data: bytes, path: str) -> RawInteractions:
  """Parses `user item` lines, already time-ordered within each user."""
  values, _ = parse_table(data, path, sep=b" ", num_fields=2)
  table = values.reshape(-1, 2)
  return RawInteractions(users=table[:, 0].copy(), items=table[:, 1].copy())


def parse_user_lines(data: bytes, path: str) -> RawInteractions:
  """Parses S3-Rec `user item_1 ... item_n` lines, one line per user."""
  values, counts = parse_table(data, path, sep=b" ", num_fields=None)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  users = values[starts]
  order = np.argsort(users, kind="stable")
  repeated = np.flatnonzero(users[order][1:] == users[order][:-1])
  if repeated.size:
    # A second line for a user would silently merge two histories.
    line = int(order[repeated[0] + 1]) + 1
    raise DataError(f"{path}:{line}: user {users[order][repeated[0]]} "
                    "already has a line")
  is_item = np.ones(values.size, bool)
  is_item[starts] = False
  return RawInteractions(
      users=np.repeat(users, counts - 1), items=values[is_item])


def parse_item2attributes(data: bytes, path: str) -> dict[int, list[int]]:
  """Parses an S3-Rec `<Name>_item2attributes.json`: {item: [attr, ...]}."""
  try:
    table = json.loads(data)
    if not isinstance(table, dict):
      raise ValueError("expected a JSON object {item_id: [attr_id, ...]}")
    parsed = {}
    for key, attrs in table.items():
      if not isinstance(attrs, list) or not all(
          isinstance(a, int) and a >= 0 for a in attrs):
        raise ValueError(f"item {key}: expected a list of non-negative ints")
      parsed[int(key)] = attrs
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: {e.msg} (column {e.colno})") from e
  except ValueError as e:
    raise DataError(f"{path}: {e}") from e
  return parsed


# The 18 genres of ML-1M's movies.dat (its README), in that order: attribute
# ids 0-17. A movie's release decade follows as one more attribute,
# 18 + (decade - 1900) / 10, from the year at the end of its title.
MOVIELENS_GENRES = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical",
    "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
_FIRST_DECADE, _LAST_DECADE = 1900, 2020
_TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")


def parse_movielens_movies(data: bytes, path: str) -> dict[int, list[int]]:
  """Parses ML-1M `MovieID::Title (Year)::Genre|Genre` lines (Latin-1).

  Returns:
    {movie id: [genre ids..., decade id]} with the ids of `MOVIELENS_GENRES`
    (0-17) and the release decade (18 for the 1900s, ..., 30 for 2020s).
  """
  genre_ids = {g: i for i, g in enumerate(MOVIELENS_GENRES)}
  parsed = {}
  for line, text in enumerate(data.decode("latin-1").splitlines(), start=1):
    if not text.strip():
      continue
    fields = text.split("::")
    if len(fields) != 3:
      raise DataError(f"{path}:{line}: expected MovieID::Title::Genres, got "
                      f"{len(fields)} fields")
    movie, title, genres = fields
    if not movie.isdigit():
      raise DataError(f"{path}:{line}: MovieID {movie!r} is not a number")
    if int(movie) in parsed:
      raise DataError(f"{path}:{line}: movie {movie} already has a line")
    year = _TITLE_YEAR.search(title)
    if year is None or not (
        _FIRST_DECADE <= int(year.group(1)) < _LAST_DECADE + 10):
      raise DataError(f"{path}:{line}: title {title!r} does not end with a "
                      f"year ({_FIRST_DECADE}-{_LAST_DECADE + 9}) in "
                      "parentheses")
    attrs = []
    for genre in genres.split("|"):
      if genre not in genre_ids:
        raise DataError(f"{path}:{line}: unknown genre {genre!r}; allowed: "
                        f"{', '.join(MOVIELENS_GENRES)}")
      attrs.append(genre_ids[genre])
    decade = (int(year.group(1)) - _FIRST_DECADE) // 10
    parsed[int(movie)] = attrs + [len(MOVIELENS_GENRES) + decade]
  return parsed
