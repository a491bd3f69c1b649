"""TFRecord files of tf.train.Example records, read without TensorFlow.

Google's CXR Foundation tool writes one TFRecord per image whose first record is a
``tf.train.Example`` with the embedding as the float feature ``embedding`` (spec prior_and_fmkd.md
B.1). Two pieces are needed to read that without TensorFlow:
  * the TFRecord framing: per record a little-endian uint64 length, the masked CRC-32C of those 8
    bytes, the payload, the masked CRC-32C of the payload (both checked here);
  * the ``Example`` protobuf: decoded by the protobuf runtime with message classes built at import
    from TensorFlow's ``example.proto`` / ``feature.proto`` field numbers (BytesList / FloatList /
    Int64List ``value = 1``; Feature ``bytes_list = 1, float_list = 2, int64_list = 3``;
    Features ``map<string, Feature> feature = 1``; Example ``features = 1``).
"""
from __future__ import annotations

import struct
from typing import Iterator

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from cxrjax.data.errors import DataError

_F = descriptor_pb2.FieldDescriptorProto


def _example_class():
  """The tf.train.Example message class, from a private descriptor pool."""
  proto = descriptor_pb2.FileDescriptorProto(name="cxrjax/tf_example.proto", package="cxrjax_tf",
                                             syntax="proto3")

  def message(name, *fields):
    m = proto.message_type.add(name=name)
    for fname, number, ftype, label, type_name, oneof in fields:
      f = m.field.add(name=fname, number=number, type=ftype, label=label)
      if type_name:
        f.type_name = type_name
      if oneof is not None:
        f.oneof_index = oneof
    return m

  rep, opt = _F.LABEL_REPEATED, _F.LABEL_OPTIONAL
  message("BytesList", ("value", 1, _F.TYPE_BYTES, rep, None, None))
  message("FloatList", ("value", 1, _F.TYPE_FLOAT, rep, None, None))
  message("Int64List", ("value", 1, _F.TYPE_INT64, rep, None, None))
  feature = message("Feature",
                    ("bytes_list", 1, _F.TYPE_MESSAGE, opt, ".cxrjax_tf.BytesList", 0),
                    ("float_list", 2, _F.TYPE_MESSAGE, opt, ".cxrjax_tf.FloatList", 0),
                    ("int64_list", 3, _F.TYPE_MESSAGE, opt, ".cxrjax_tf.Int64List", 0))
  feature.oneof_decl.add(name="kind")
  features = message("Features", ("feature", 1, _F.TYPE_MESSAGE, rep,
                                  ".cxrjax_tf.Features.FeatureEntry", None))
  entry = features.nested_type.add(name="FeatureEntry")
  entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=opt)
  entry.field.add(name="value", number=2, type=_F.TYPE_MESSAGE, label=opt,
                  type_name=".cxrjax_tf.Feature")
  entry.options.map_entry = True
  message("Example", ("features", 1, _F.TYPE_MESSAGE, opt, ".cxrjax_tf.Features", None))
  pool = descriptor_pool.DescriptorPool()
  pool.Add(proto)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("cxrjax_tf.Example"))


Example = _example_class()


def _crc32c_table() -> np.ndarray:
  poly, table = 0x82F63B78, np.zeros(256, np.uint32)
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ poly if c & 1 else c >> 1
    table[i] = c
  return table


_TABLE = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
  """TFRecord's checksum: CRC-32C (Castagnoli) rotated right by 15 plus 0xa282ead8."""
  crc = 0xFFFFFFFF
  for b in data:
    crc = int(_TABLE[(crc ^ b) & 0xFF]) ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path: str, limit: int | None = None) -> Iterator[bytes]:
  """Payloads of the TFRecord file `path` (at most `limit`); DataError on a truncated file or
  a checksum mismatch (naming the file and the record)."""
  with open(path, "rb") as f:
    k = 0
    while limit is None or k < limit:
      head = f.read(12)
      if not head:
        return
      if len(head) < 12:
        raise DataError(f"{path}: record {k} is truncated (a TFRecord file?)")
      (length,), (crc,) = struct.unpack("<Q", head[:8]), struct.unpack("<I", head[8:])
      if masked_crc32c(head[:8]) != crc:
        raise DataError(f"{path}: record {k} has a bad length checksum (not a TFRecord file?)")
      payload, tail = f.read(length), f.read(4)
      if len(payload) < length or len(tail) < 4:
        raise DataError(f"{path}: record {k} is truncated")
      if masked_crc32c(payload) != struct.unpack("<I", tail)[0]:
        raise DataError(f"{path}: record {k} has a bad data checksum (corrupt file)")
      yield payload
      k += 1


def parse_example(payload: bytes) -> dict[str, np.ndarray | list[bytes]]:
  """A serialized tf.train.Example -> {feature name: float32 / int64 array, or list of bytes}."""
  ex = Example()
  ex.ParseFromString(payload)
  out: dict = {}
  for name, feature in ex.features.feature.items():
    kind = feature.WhichOneof("kind")
    if kind == "float_list":
      out[name] = np.asarray(feature.float_list.value, np.float32)
    elif kind == "int64_list":
      out[name] = np.asarray(feature.int64_list.value, np.int64)
    elif kind == "bytes_list":
      out[name] = list(feature.bytes_list.value)
    else:
      out[name] = np.zeros(0, np.float32)
  return out


def read_float_feature(path: str, feature: str = "embedding") -> np.ndarray:
  """The float feature `feature` of the first Example in TFRecord file `path` (the seed's
  tfrecord_to_dat.py reading of a CXR Foundation output)."""
  payload = next(read_records(path, limit=1), None)
  if payload is None:
    raise DataError(f"{path}: no record (empty TFRecord file)")
  try:
    features = parse_example(payload)
  except Exception as e:  # protobuf's DecodeError and friends
    raise DataError(f"{path}: the first record is not a tf.train.Example ({e})") from None
  if feature not in features:
    raise DataError(f"{path}: no feature {feature!r} in the first record; it has "
                    f"{sorted(features)}")
  value = features[feature]
  if not isinstance(value, np.ndarray) or value.dtype != np.float32:
    raise DataError(f"{path}: feature {feature!r} is not a float list")
  return value
