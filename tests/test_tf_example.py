"""TFRecord / tf.train.Example reading without TensorFlow (cxrjax.data.tf_example), and CXR
Foundation-style per-image .tfrecord embeddings through data.embeddings."""
import struct

import numpy as np
import pytest

from cxrjax.data import tf_example
from cxrjax.data.embeddings import load_embeddings
from cxrjax.data.errors import DataError


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def example_bytes(floats: dict, ints: dict = {}, strings: dict = {}) -> bytes:
  """A tf.train.Example encoded by hand from the wire format (TensorFlow's field numbers),
  independently of the protobuf runtime the reader uses. Float lists are packed, as TF writes."""
  entries = b""
  for key, values in floats.items():
    packed = _len_field(1, np.asarray(values, "<f4").tobytes())  # FloatList.value
    feature = _len_field(2, packed)  # Feature.float_list
    entries += _len_field(1, _len_field(1, key.encode()) + _len_field(2, feature))
  for key, values in ints.items():
    packed = _len_field(1, b"".join(_varint(v) for v in values))
    entries += _len_field(1, _len_field(1, key.encode()) + _len_field(2, _len_field(3, packed)))
  for key, values in strings.items():
    blist = b"".join(_len_field(1, v) for v in values)
    entries += _len_field(1, _len_field(1, key.encode()) + _len_field(2, _len_field(1, blist)))
  return _len_field(1, entries)  # Example.features


def write_tfrecord(path, payloads):
  """TFRecord framing by tensorboardX's writer (an independent implementation of it)."""
  from tensorboardX.record_writer import RecordWriter
  w = RecordWriter(str(path))
  for p in payloads:
    w.write(p)
  w.close()


def test_parse_hand_encoded_example_and_framing(tmp_path):
  emb = np.random.default_rng(0).normal(size=1376).astype(np.float32)
  path = tmp_path / "a.tfrecord"
  write_tfrecord(path, [example_bytes({"embedding": emb}, {"n": [3, 300]}, {"id": [b"x1"]}),
                        example_bytes({"embedding": emb * 2})])
  records = list(tf_example.read_records(str(path)))
  assert len(records) == 2
  parsed = tf_example.parse_example(records[0])
  np.testing.assert_array_equal(parsed["embedding"], emb)
  np.testing.assert_array_equal(parsed["n"], [3, 300])
  assert parsed["id"] == [b"x1"]
  np.testing.assert_array_equal(tf_example.read_float_feature(str(path)), emb)  # first record


def test_corrupt_truncated_and_foreign_files(tmp_path):
  good = tmp_path / "g.tfrecord"
  write_tfrecord(good, [example_bytes({"embedding": np.ones(8)})])
  data = good.read_bytes()
  (tmp_path / "flip.tfrecord").write_bytes(data[:20] + bytes([data[20] ^ 1]) + data[21:])
  with pytest.raises(DataError, match="bad data checksum"):
    tf_example.read_float_feature(str(tmp_path / "flip.tfrecord"))
  (tmp_path / "cut.tfrecord").write_bytes(data[:-3])
  with pytest.raises(DataError, match="truncated"):
    tf_example.read_float_feature(str(tmp_path / "cut.tfrecord"))
  (tmp_path / "npy.tfrecord").write_bytes(b"\x93NUMPY" + b"\0" * 40)
  with pytest.raises(DataError, match="length checksum"):
    tf_example.read_float_feature(str(tmp_path / "npy.tfrecord"))
  with pytest.raises(DataError, match="no feature 'embedding'.*'other'"):
    path = tmp_path / "other.tfrecord"
    write_tfrecord(path, [example_bytes({"other": [1.0]})])
    tf_example.read_float_feature(str(path))
  (tmp_path / "empty.tfrecord").write_bytes(b"")
  with pytest.raises(DataError, match="no record"):
    tf_example.read_float_feature(str(tmp_path / "empty.tfrecord"))
  assert struct.calcsize("<Q") == 8


def test_cxr_foundation_layout_through_load_embeddings(tmp_path):
  ids = [f"img{i}" for i in range(4)]
  emb = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)
  for i, e in zip(ids, emb):
    write_tfrecord(tmp_path / f"{i}.tfrecord", [example_bytes({"embedding": e})])
  np.testing.assert_array_equal(load_embeddings(str(tmp_path), ids[::-1], 16), emb[::-1])
  with pytest.raises(DataError, match="expected \\(17,\\)"):
    load_embeddings(str(tmp_path), ids, 17)
  with pytest.raises(DataError, match="first missing: img9.tfrecord"):
    load_embeddings(str(tmp_path), ids + ["img9"], 16)
