"""A versioned, checksummed byte format for deployed networks (:class:`empf_jax.deploy.Deployed`).

Layout (all integers little-endian)::

    offset  size  content
    0       8     magic b"EMPFBNDL"
    8       4     format version (uint32), currently 1
    12      4     header length H in bytes (uint32)
    16      8     payload length P in bytes (uint64)
    24      H     header, UTF-8 JSON: {"architecture": {name, options, family, layout},
                  "arrays": [{"name", "dtype", "shape", "offset", "nbytes"}, ...]}
    24+H    P     payload: the arrays' raw bytes in C order, each at its offset
    24+H+P  32    SHA-256 of every byte before it

Reading checks, in this order, the length of the fixed prefix, the magic, the version, the declared
length against the actual one, the checksum, and then that the header is well formed and lists
exactly the arrays the architecture needs with the right shapes and dtypes. Every failure raises
:class:`BundleError` saying what is wrong. The library never touches the file system: bundles are
bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np

from empf_jax.deploy import Deployed, architecture_from_dict, architecture_to_dict, expected_arrays

MAGIC = b"EMPFBNDL"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIIQ")
_DIGEST_SIZE = hashlib.sha256().digest_size
DTYPES: dict[str, np.dtype] = {"<f4": np.dtype("<f4"), "|u1": np.dtype("|u1")}


class BundleError(ValueError):
  """The bytes are not a readable bundle (wrong magic or version, truncated or corrupted)."""


def to_bytes(deployed: Deployed) -> bytes:
  """Serialises a deployed network; :func:`from_bytes` restores it exactly."""
  entries, chunks, offset = [], [], 0
  for name in sorted(deployed.params):
    array = np.asarray(deployed.params[name])
    dtype = array.dtype.newbyteorder("<")
    if dtype.str not in DTYPES:
      raise BundleError(f"array {name!r} has dtype {array.dtype}; allowed: float32, uint8")
    data = np.ascontiguousarray(array, dtype=dtype).tobytes()
    entries.append(
      {
        "name": name,
        "dtype": dtype.str,
        "shape": list(array.shape),
        "offset": offset,
        "nbytes": len(data),
      }
    )
    chunks.append(data)
    offset += len(data)
  header = json.dumps(
    {"architecture": architecture_to_dict(deployed.arch), "arrays": entries},
    sort_keys=True,
    separators=(",", ":"),
  ).encode("utf-8")
  body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header), offset) + header + b"".join(chunks)
  return body + hashlib.sha256(body).digest()


def _check_frame(data: bytes) -> tuple[int, int]:
  """Validates magic, version, length and checksum; returns the header and payload lengths."""
  minimum = _PREFIX.size + _DIGEST_SIZE
  if len(data) < minimum:
    raise BundleError(f"truncated: {len(data)} bytes, a bundle has at least {minimum}")
  magic, version, header_len, payload_len = _PREFIX.unpack_from(data)
  if magic != MAGIC:
    raise BundleError(f"wrong magic {magic!r}: not an EM-PF bundle (expected {MAGIC!r})")
  if version != FORMAT_VERSION:
    raise BundleError(
      f"format version {version} is not supported; this reader reads version {FORMAT_VERSION}"
    )
  declared = _PREFIX.size + header_len + payload_len + _DIGEST_SIZE
  body, digest = data[:-_DIGEST_SIZE], data[-_DIGEST_SIZE:]
  if hashlib.sha256(body).digest() != digest:
    if declared > len(data):
      raise BundleError(
        f"truncated: {len(data)} bytes, the bundle declares {declared} (checksum mismatch)"
      )
    if declared < len(data):
      raise BundleError(
        f"{len(data)} bytes but the bundle declares {declared}: trailing data or "
        "a corrupted length field (checksum mismatch)"
      )
    raise BundleError(
      "checksum mismatch: the bundle is corrupted (SHA-256 of the header and "
      "payload differs from the stored one)"
    )
  if declared != len(data):
    raise BundleError(f"{len(data)} bytes but the bundle declares {declared}")
  return header_len, payload_len


def from_bytes(data: bytes) -> Deployed:
  """Reads a bundle written by :func:`to_bytes`.

  Raises:
    BundleError: naming what is wrong (truncation, magic, version, checksum, malformed header,
      missing, unexpected or misshapen arrays).
  """
  data = bytes(data)
  header_len, payload_len = _check_frame(data)
  start = _PREFIX.size
  try:
    header = json.loads(data[start : start + header_len].decode("utf-8"))
    arch = architecture_from_dict(header["architecture"])
    entries = header["arrays"]
    expected = expected_arrays(arch)
  except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
    raise BundleError(f"malformed header: {error}") from error
  if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
    raise BundleError("malformed header: 'arrays' must be a list of objects")
  payload = data[start + header_len : start + header_len + payload_len]
  params = {}
  for entry in entries:
    name = entry.get("name")
    if not isinstance(name, str) or name not in expected:
      raise BundleError(f"unexpected array {name!r} for architecture {arch.name}")
    if name in params:
      raise BundleError(f"array {name!r} is listed twice")
    dtype = DTYPES.get(entry.get("dtype"))
    shape = tuple(entry.get("shape", ()))
    want_shape, want_dtype = expected[name]
    if dtype is None or dtype != want_dtype or shape != want_shape:
      raise BundleError(
        f"array {name!r} is {entry.get('dtype')} {list(shape)}; the architecture "
        f"needs {want_dtype.str} {list(want_shape)}"
      )
    offset, nbytes = entry.get("offset"), entry.get("nbytes")
    if (
      not isinstance(offset, int)
      or nbytes != int(np.prod(shape)) * dtype.itemsize
      or offset < 0
      or offset + nbytes > payload_len
    ):
      raise BundleError(
        f"array {name!r}: offset {offset} / size {nbytes} do not fit the "
        f"{payload_len}-byte payload or its shape"
      )
    params[name] = (
      np.frombuffer(payload, dtype, count=int(np.prod(shape)), offset=offset).reshape(shape).copy()
    )
  missing = sorted(set(expected) - set(params))
  if missing:
    raise BundleError(f"missing arrays for architecture {arch.name}: {missing}")
  return Deployed(arch, params)
