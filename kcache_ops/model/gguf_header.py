"""A walk over a GGUF file's header without the ``gguf`` package, for the one question gguf cannot
answer: which tensor has a GGML type number gguf does not know (its reader stops on the number
before it names the tensor).

The header (GGUF v2 and v3): magic, version (uint32), tensor count and key/value count (uint64),
the key/values (key string, value type uint32, value), then per tensor its name (string), dim
count (uint32), dims (uint64 each), GGML type (uint32) and data offset (uint64). A string is a
uint64 length and its bytes; an array an item type (uint32), a count (uint64) and the items.
"""
import os
import struct

# GGUF value type -> bytes of one value, for the fixed-size ones (8: string, 9: array)
SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9


class _Header:
    """Reads a GGUF header's numbers in the file's byte order, refusing a length past its end."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size
        f.seek(4)  # past the magic
        version = f.read(4)
        # a version in the high bytes of a little-endian uint32: the file is big-endian
        self.order = "<" if version[:2] != b"\0\0" else ">"

    def num(self, fmt: str) -> int:
        n = struct.calcsize(fmt)
        return struct.unpack(self.order + fmt, self.f.read(n))[0]

    def within(self, n: int) -> int:
        """n, where the next n bytes lie inside the file (a corrupt length is not read)."""
        if n < 0 or self.f.tell() + n > self.size:
            raise ValueError(f"a length of {n} bytes runs past the end of the file")
        return n

    def skip(self, n: int):
        self.f.seek(self.within(n), os.SEEK_CUR)

    def string(self) -> bytes:
        return self.f.read(self.within(self.num("Q")))

    def skip_value(self, vtype: int):
        if vtype == STRING:
            self.skip(self.num("Q"))
        elif vtype == ARRAY:
            item, count = self.num("I"), self.num("Q")
            if item in SCALAR_BYTES:
                self.skip(count * SCALAR_BYTES[item])
            else:
                for _ in range(count):
                    self.skip_value(item)
        else:
            self.skip(SCALAR_BYTES[vtype])  # KeyError for a type GGUF does not have


def tensor_of_type(path: str, ggml_type: int):
    """The name of the first tensor of GGML type number ``ggml_type`` in the GGUF file ``path``,
    or None where its header cannot be walked so (corrupt, truncated, or none has that type)."""
    try:
        with open(path, "rb") as f:
            h = _Header(f, os.path.getsize(path))
            tensors, kvs = h.num("Q"), h.num("Q")
            for _ in range(kvs):
                h.string()
                h.skip_value(h.num("I"))
            for _ in range(tensors):
                name = h.string()
                h.skip(8 * h.num("I"))  # the dims
                if h.num("I") == ggml_type:
                    return name.decode("utf-8", "replace")
                h.skip(8)  # the data offset
    except (OSError, struct.error, ValueError, KeyError, RecursionError):
        pass
    return None
