"""Source text for the external solver programs the tests write: float64 .npy in and out with the
standard library only, as a compiled program would do it. Without numpy such a program starts in ~20 ms
instead of ~170 ms, and it runs once per solver call (a helper module, no tests)."""

NPY_IO = '''import ast, math, struct, sys
def load(path):
    data = open(path, "rb").read()
    n = struct.unpack("<H", data[8:10])[0]
    head = ast.literal_eval(data[10 : 10 + n].decode("latin1"))
    assert head["descr"] == "<f8" and not head["fortran_order"], head
    return head["shape"], struct.unpack(f"<{(len(data) - 10 - n) // 8}d", data[10 + n :])
def save(path, shape, values):
    head = f"{{'descr': '<f8', 'fortran_order': False, 'shape': {tuple(shape)}, }}"
    head += " " * (-(len(head) + 11) % 64) + "\\n"
    body = head.encode("latin1") + struct.pack(f"<{len(values)}d", *values)
    open(path, "wb").write(b"\\x93NUMPY\\x01\\x00" + struct.pack("<H", len(head)) + body)
'''
