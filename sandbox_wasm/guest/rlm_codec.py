"""Binary value codec shared by the host and the guest (both import this file).

Values: None, bool, int, float, str, bytes, list (tuples travel as lists) and
dict of these. Strings and bytes travel as raw length-prefixed segments, so a
100 MB prompt is never escaped or re-parsed: the encoder yields a list of
buffers (large payloads as their own segment, no join) and the decoder reads
straight from a memoryview.

Frame on the wire: 8-byte little-endian payload length, then the payload.
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


class CodecError(ValueError):
    """A value that cannot be encoded, or bytes that are not a valid encoding."""


def encode(value):
    """Encode `value` into a list of buffers (their concatenation is the payload)."""
    segments = []
    head = bytearray()
    _encode(value, head, segments, 0)
    if head:
        segments.append(head)
    return segments


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


def _encode(value, head, segments, depth):
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
        if -(2**63) <= value < 2**63:
            head += b"i"
            head += _I64.pack(value)
        else:
            _blob(b"I", str(value).encode("ascii"), head, segments)
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
        for item in value:
            _encode(item, head, segments, depth + 1)
    elif isinstance(value, dict):
        head += b"d"
        head += _U32.pack(len(value))
        for key, item in value.items():
            if not isinstance(key, _SCALAR_KEYS):
                raise CodecError("dict key of type %s cannot be sent (use str keys)"
                                 % type(key).__name__)
            _encode(key, head, segments, depth + 1)
            _encode(item, head, segments, depth + 1)
    else:
        raise CodecError(
            "a value of type %s cannot be sent between the sandbox and the host "
            "(allowed: str, bytes, int, float, bool, None, list, dict); convert it first"
            % type(value).__name__)


def decode(buf):
    """Decode one value from a bytes-like object; the whole buffer must be used."""
    view = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf.cast("B")
    try:
        value, end = _decode(view, 0, 0)
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
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


def _decode(view, pos, depth):
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
        return int(str(view[start:end], "ascii")), end
    if tag == 0x6C:  # l
        (count,) = _U32.unpack_from(view, pos)
        pos += 4
        items = []
        for _ in range(count):
            item, pos = _decode(view, pos, depth + 1)
            items.append(item)
        return items, pos
    if tag == 0x64:  # d
        (count,) = _U32.unpack_from(view, pos)
        pos += 4
        result = {}
        for _ in range(count):
            key, pos = _decode(view, pos, depth + 1)
            if isinstance(key, list):
                raise CodecError("malformed payload: list used as a dict key")
            result[key], pos = _decode(view, pos, depth + 1)
        return result, pos
    raise CodecError("malformed payload: unknown tag %r" % chr(tag))
