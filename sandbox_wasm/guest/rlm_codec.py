"""Binary value codec shared by the host and the guest (both import this file).

Values: None, bool, int, float, str, bytes, list (tuples travel as lists) and
dict of these. Strings and bytes travel as raw length-prefixed segments, so a
100 MB prompt is never escaped or re-parsed: the encoder yields a list of
buffers (large payloads as their own segment, no join) and the decoder reads
straight from a memoryview.

Frame on the wire: 8-byte little-endian payload length, then the payload.

The host decodes what guest code wrote, so decoding is bounded in what a
payload can make it do (the encoder refuses the same values, so a guest sees
a clear error before anything is sent):
- work: dict keys are str, bytes, None, bool, float or an int within 64 bits.
  A big int's hash is the int modulo 2**61 - 1, so guest code can make any
  number of distinct keys share one hash and turn filling a dict quadratic;
  str and bytes hashes are randomized per process, and no more than a few
  dozen 64-bit ints or floats share a hash.
- memory: a 5-byte empty list costs the host ~64 bytes, so a frame of them
  amplified ~13x; a payload holds at most _MAX_VALUES values plus one per
  _BYTES_PER_VALUE bytes, charged at each list or dict header before its items
  are allocated.
- ints: at most _MAX_INT_DIGITS digits (CPython's default str conversion
  limit, which a guest can lift for itself but not for the host).
"""

import struct

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
FRAME_HEADER = _U64
# Payloads at least this large become their own segment instead of being copied
# into the shared head buffer.
_BIG = 4096
_MAX_DEPTH = 64
_SCALAR_KEYS = (str, bytes, int, float, bool, type(None))
# Values (items of lists, keys and values of dicts) one payload may hold: a
# fixed allowance, plus one per _BYTES_PER_VALUE bytes of the payload. A value
# costs the host at most ~75 bytes (an empty dict and its slot), so the
# allowance costs it at most ~150 MB and the rest ~2.3x the payload; data whose
# values average 32 bytes (prompts, documents, rows of a few fields) passes at
# any size, and 1,000 prompts or a snapshot's names are far below the allowance.
_MAX_VALUES = 1 << 21
_BYTES_PER_VALUE = 32
_MAX_INT_DIGITS = 4300
# An int of more bits has more than _MAX_INT_DIGITS digits (no str() is tried).
_MAX_INT_BITS = 14285
_INT64_MIN = -(2**63)
_INT64_END = 2**63
_TAG_BIG_INT = 0x49  # I
_TAG_LIST = 0x6C  # l
_TAG_DICT = 0x64  # d
_REFUSED_KEY_TAGS = frozenset((_TAG_BIG_INT, _TAG_LIST, _TAG_DICT))


class CodecError(ValueError):
    """A value that cannot be encoded, or bytes that are not a valid encoding."""


class CodecLimit(CodecError):
    """A well-formed value over the codec's bounds (too many values, a big-int
    dict key, an int too long): refused, not a sign of a broken channel."""


def encode(value):
    """Encode `value` into a list of buffers (their concatenation is the payload)."""
    segments = []
    head = bytearray()
    values = [0]
    _encode(value, head, segments, 0, values)
    if head:
        segments.append(head)
    _check_value_count(values[0], sum(len(s) for s in segments))
    return segments


def _value_budget(payload_size):
    return _MAX_VALUES + payload_size // _BYTES_PER_VALUE


def _check_value_count(count, payload_size):
    """Refuse on encode what decode would refuse (the same budget)."""
    budget = _value_budget(payload_size)
    if count > budget:
        raise CodecLimit(
            "the data holds %s values (list items, dict keys and values); a message of %s "
            "bytes may hold at most %s: send it in parts, or as fewer, larger items (e.g. "
            "joined into one str)" % (format(count, ","), format(payload_size, ","),
                                      format(budget, ",")))


def encode_frame(value):
    """Encode `value` as a full frame: [header, *payload segments]."""
    segments = encode(value)
    total = sum(len(s) for s in segments)
    return [FRAME_HEADER.pack(total)] + segments, total + FRAME_HEADER.size


def _blob(tag, data, head, segments):
    head += tag
    head += _U64.pack(len(data))
    if len(data) >= _BIG:
        segments.append(head[:])
        del head[:]
        segments.append(data)
    else:
        head += data


def _encode(value, head, segments, depth, values):
    # values: [number of list items, dict keys and dict values so far]
    if depth > _MAX_DEPTH:
        raise CodecError("value nested deeper than %d levels" % _MAX_DEPTH)
    if value is None:
        head += b"N"
    elif value is True:
        head += b"T"
    elif value is False:
        head += b"F"
    elif isinstance(value, int):  # bool was handled above
        value = int(value)
        if _INT64_MIN <= value < _INT64_END:
            head += b"i"
            head += _I64.pack(value)
        else:
            _blob(b"I", _int_digits(value), head, segments)
    elif isinstance(value, float):
        head += b"f"
        head += _F64.pack(value)
    elif isinstance(value, str):
        _blob(b"s", value.encode("utf-8", "surrogatepass"), head, segments)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        _blob(b"b", bytes(value) if isinstance(value, memoryview) else value, head, segments)
    elif isinstance(value, (list, tuple)):
        head += b"l"
        head += _U32.pack(len(value))
        values[0] += len(value)
        for item in value:
            _encode(item, head, segments, depth + 1, values)
    elif isinstance(value, dict):
        head += b"d"
        head += _U32.pack(len(value))
        values[0] += 2 * len(value)
        for key, item in value.items():
            if not isinstance(key, str):
                _check_key(key)
            _encode(key, head, segments, depth + 1, values)
            _encode(item, head, segments, depth + 1, values)
    else:
        raise CodecError(
            "a value of type %s cannot be sent between the sandbox and the host "
            "(allowed: str, bytes, int, float, bool, None, list, dict); convert it first"
            % type(value).__name__)


def _int_digits(value):
    """The decimal digits of an int beyond 64 bits, refused past _MAX_INT_DIGITS."""
    # bit_length first: str() of a huge int is slow, and works past the limit
    # in a guest that lifted it (sys.set_int_max_str_digits(0)).
    text = None
    if value.bit_length() <= _MAX_INT_BITS:
        try:
            text = str(value)
        except ValueError:  # over the guest's own conversion limit
            pass
    if text is None or len(text) - (value < 0) > _MAX_INT_DIGITS:
        raise CodecLimit("an int of more than %s digits (or more than this interpreter's "
                         "sys.get_int_max_str_digits()) cannot be sent; send it as a str "
                         "or bytes instead" % format(_MAX_INT_DIGITS, ","))
    return text.encode("ascii")


def _check_key(key):
    """Refuse a dict key the decoder refuses (see the module docstring)."""
    if not isinstance(key, _SCALAR_KEYS):
        raise CodecError("dict key of type %s cannot be sent (use str keys)"
                         % type(key).__name__)
    if isinstance(key, int) and not _INT64_MIN <= key < _INT64_END:
        raise CodecLimit("an int dict key beyond 64 bits cannot be sent (such keys can be "
                         "made to share one hash); use str keys")


def decode(buf):
    """Decode one value from a bytes-like object; the whole buffer must be used."""
    view = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf.cast("B")
    try:
        value, end = _decode(view, 0, 0, [_value_budget(len(view))])
    except CodecError:
        raise
    except (struct.error, IndexError, ValueError) as exc:  # ValueError: bad utf-8 or digits
        raise CodecError("malformed payload: %s" % exc) from None
    if end != len(view):
        raise CodecError("malformed payload: %d trailing bytes" % (len(view) - end))
    return value


def _blob_at(view, pos):
    (size,) = _U64.unpack_from(view, pos)
    start = pos + 8
    end = start + size
    if end > len(view):
        raise CodecError("malformed payload: segment runs past the end")
    return start, end


def _take_values(left, count):
    """Charge `count` values to the payload's budget before they are allocated."""
    left[0] -= count
    if left[0] < 0:
        raise CodecLimit("payload holds more values than its size allows (at most %s plus "
                         "one per %d bytes)" % (format(_MAX_VALUES, ","), _BYTES_PER_VALUE))


def _decode(view, pos, depth, left):
    # left: [values the payload may still hold]
    if depth > _MAX_DEPTH:
        raise CodecError("payload nested deeper than %d levels" % _MAX_DEPTH)
    tag = view[pos]
    pos += 1
    if tag == 0x4E:  # N
        return None, pos
    if tag == 0x54:  # T
        return True, pos
    if tag == 0x46:  # F
        return False, pos
    if tag == 0x69:  # i
        return _I64.unpack_from(view, pos)[0], pos + 8
    if tag == 0x66:  # f
        return _F64.unpack_from(view, pos)[0], pos + 8
    if tag in (0x73, 0x62, 0x49):  # s b I
        start, end = _blob_at(view, pos)
        if tag == 0x73:
            return str(view[start:end], "utf-8", "surrogatepass"), end
        if tag == 0x62:
            return bytes(view[start:end]), end
        if end - start > _MAX_INT_DIGITS + 1:  # a sign and the digits
            raise CodecLimit("payload holds an int of more than %s digits"
                             % format(_MAX_INT_DIGITS, ","))
        return int(str(view[start:end], "ascii")), end
    if tag == _TAG_LIST:
        (count,) = _U32.unpack_from(view, pos)
        pos += 4
        _take_values(left, count)
        items = []
        for _ in range(count):
            item, pos = _decode(view, pos, depth + 1, left)
            items.append(item)
        return items, pos
    if tag == _TAG_DICT:
        (count,) = _U32.unpack_from(view, pos)
        pos += 4
        _take_values(left, 2 * count)
        result = {}
        for _ in range(count):
            if view[pos] in _REFUSED_KEY_TAGS:
                _refuse_key(view[pos])
            key, pos = _decode(view, pos, depth + 1, left)
            result[key], pos = _decode(view, pos, depth + 1, left)
        return result, pos
    raise CodecError("malformed payload: unknown tag %r" % chr(tag))


def _refuse_key(tag):
    """Refuse a dict key by its tag, before it is decoded (see the module docstring)."""
    if tag == _TAG_BIG_INT:
        raise CodecLimit("payload holds an int dict key beyond 64 bits (such keys can be "
                         "made to share one hash)")
    if tag == _TAG_LIST or tag == _TAG_DICT:
        raise CodecError("malformed payload: a list or dict used as a dict key")
