"""Pre-scan a torch checkpoint's pickle opcodes, in bounded memory, before ``torch.load`` reads it.

Why: ``torch.load(weights_only=True)`` refuses globals outside its allowlist, but it builds
whatever the allowed ones describe before anyone can look at the result: ``bytearray(2**30)``
from a 229-byte file, storages that claim gigabytes the file does not hold, containers nested
100k deep whose later traversal exhausts the recursion limit. :func:`scan_checkpoint` reads the
opcode streams with :func:`pickletools.genops` (the standard library's opcode reader, which
builds nothing), follows what each opcode would push symbolically (a node per value, the value
itself only for small constants) and refuses such files first. torch's allowlist still
applies afterwards: this is an extra, stricter gate, not a replacement.

Both ``torch.save`` formats are read:

- zip (the default): the pickle is ``<archive>/data.pkl``, each storage a stored (uncompressed)
  record ``<archive>/data/<key>``;
- legacy (``_use_new_zipfile_serialization=False``, the authors' reference files): five
  concatenated pickles (magic number, protocol version, sys_info, the object, the storage
  keys), then the raw storages, each an 8-byte element count followed by its bytes.

The limits are module constants read at call time, so a deployment can change them
(``robustx.io.pickle_scan.CKPT_MAX_BYTES = ...``); the real files are far below every one.
"""

from __future__ import annotations

import io
import logging
import os
import pickletools
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "PickleScanError",
    "ScanReport",
    "scan_checkpoint",
    "LEGACY_MAX_BYTES",
    "CKPT_MAX_BYTES",
    "MAX_PICKLE_BYTES",
    "MAX_OPCODES",
    "MAX_DEPTH",
    "MAX_ALLOC_BYTES",
    "CHECKPOINT_GLOBALS",
    "CALLABLE_GLOBALS",
]

logger = logging.getLogger(__name__)

MiB = 2**20
#: Largest authors' ``.pt`` file read; the four reference files are about 3 MB each.
LEGACY_MAX_BYTES = 16 * MiB
#: Largest Lightning ``.ckpt`` read; this project's checkpoints are a few MB.
CKPT_MAX_BYTES = 2 * 1024 * MiB
#: Largest pickle stream (zip: ``data.pkl``; legacy: the five pickles together); real ones are < 100 kB.
MAX_PICKLE_BYTES = 16 * MiB
#: Most opcodes in one file's pickles; the reference files have 12k, this project's ckpts 2.4k.
MAX_OPCODES = 500_000
#: Deepest container nesting; the reference files nest 7 deep, this project's ckpts 10 (recursion limit: 1000 frames).
MAX_DEPTH = 64
#: Largest size a pickle may ask ``bytes``/``bytearray`` to allocate.
MAX_ALLOC_BYTES = 64 * MiB
#: Largest zip central directory read (about 46 bytes per record; real ones are ~5 kB).
MAX_ZIP_DIRECTORY_BYTES = 4 * MiB

#: Element size of each storage type a checkpoint may name (torch writes them into persistent ids).
STORAGE_TYPES = {
    "torch.DoubleStorage": 8, "torch.FloatStorage": 4, "torch.HalfStorage": 2, "torch.BFloat16Storage": 2,
    "torch.LongStorage": 8, "torch.IntStorage": 4, "torch.ShortStorage": 2, "torch.CharStorage": 1,
    "torch.ByteStorage": 1, "torch.BoolStorage": 1,
}
#: Globals a pickle may call: the ones the reference files and this project's Lightning ckpts use.
CALLABLE_GLOBALS = frozenset({"collections.OrderedDict", "collections.Counter", "torch._utils._rebuild_tensor_v2"})
#: Every global a checkpoint may name (callables plus storage types); loaders add their own names.
CHECKPOINT_GLOBALS = CALLABLE_GLOBALS | frozenset(STORAGE_TYPES)

_REBUILD_TENSOR = "torch._utils._rebuild_tensor_v2"
_BUILDABLE = (("obj", "collections.OrderedDict"), ("obj", "collections.Counter"))
_SIZED_CALLS = frozenset({"builtins.bytearray", "builtins.bytes"})
# The opcodes torch's weights-only unpickler reads (torch/_weights_only_unpickler.py); others are refused.
_TORCH_OPCODES = frozenset({
    "GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "MARK", "TUPLE", "TUPLE1",
    "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET",
    "BININT", "BININT1", "BININT2", "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING", "BINPERSID", "BINGET",
    "LONG_BINGET", "BINPUT", "LONG_BINPUT", "LONG1", "PROTO", "STOP",
})
_MUTATORS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "BUILD", "ADDITEMS"})
_CALLS = frozenset({"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST"})
_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MARK = -1
# Opcodes that push one new value and pop nothing (constants, empty containers); GET and GLOBAL have their own rules.
_LEAVES = frozenset(op.name for op in pickletools.opcodes if not op.stack_before and len(op.stack_after) == 1
                    and op.stack_after[0] is not pickletools.markobject
                    and op.name not in ("GET", "BINGET", "LONG_BINGET", "GLOBAL", "PERSID", "EXT1", "EXT2", "EXT4"))
_NONE = ("none",)  # the value of a NONE node (a node without a value is unknown, not None)
_UNKNOWN = object()
_SMALL = 256  # constants longer than this are not remembered (only storage keys, names and sizes are needed)


class PickleScanError(ValueError):
    """A checkpoint's pickles describe something the loaders refuse; the message is the cause, on one line.

    Attributes:
        global_name: the refused global (``module.name``), when that is the cause.
        called: the global is allowed to be named but the pickle calls it.
        malformed: the file is truncated or not a torch checkpoint (rather than refused).
    """

    def __init__(self, cause: str, *, global_name: str | None = None, called: bool = False, malformed: bool = False):
        super().__init__(cause)
        self.global_name = global_name
        self.called = called
        self.malformed = malformed


@dataclass(frozen=True)
class ScanReport:
    """What a scan found (for logging and tests)."""

    format: str
    globals: frozenset[str]
    storages: int
    storage_bytes: int
    max_depth: int
    opcodes: int


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("kB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _global_name(module: str, name: str) -> str:
    """``module.name`` as torch's unpickler resolves it (Python 2 names mapped, e.g. ``__builtin__``)."""
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


class _Scan:
    """Symbolic state shared by one file's pickles: nodes (depth, parented flag, small values) and storages."""

    def __init__(self, *, zip_format: bool, allowed: frozenset[str], callable_: frozenset[str], max_depth: int,
                 max_opcodes: int, max_alloc: int):
        self.zip_format = zip_format
        self.allowed, self.callable, self.max_depth = allowed, callable_, max_depth
        self.max_opcodes, self.max_alloc = max_opcodes, max_alloc
        self.depth = array("I")
        self.parented = bytearray()
        # node -> small constant, _NONE, ("global", name), ("tuple", ids), ("obj", callable name), ("storage", key, numel)
        self.values: dict[int, Any] = {}
        self.storages: dict[str, int] = {}  # storage key -> bytes it claims
        self.globals: set[str] = set()
        self.refused: str | None = None
        self.unsupported: str | None = None
        self.opcodes = 0
        self.deepest = 0

    # -- nodes --------------------------------------------------------------------------------
    def new(self, children: Iterable[int] = (), value: Any = None) -> int:
        depth = 1 + max(map(self.depth.__getitem__, children), default=0)
        if depth > self.max_depth:
            raise PickleScanError(f"it nests containers more than {self.max_depth} deep (a recursion bomb)")
        for c in children:
            self.parented[c] = 1
        node = len(self.depth)
        self.depth.append(depth)
        self.parented.append(0)
        self.deepest = max(self.deepest, depth)
        if value is not None:
            self.values[node] = value
        return node

    def add_children(self, target: int, children: list[int]) -> None:
        """A container modified in place (APPEND, SETITEMS, BUILD ...): refuse cycles, keep depth exact."""
        if self.parented[target] or target in children:
            # The pickler fills every container before placing it in another; doing it the other
            # way round is how a pickle builds reference cycles and unbounded nesting from a few bytes.
            raise PickleScanError("it fills a container after placing it inside another (how a pickle builds reference "
                                  "cycles and unbounded nesting)")
        depth = 1 + max(map(self.depth.__getitem__, children), default=0)
        if depth > self.max_depth:
            raise PickleScanError(f"it nests containers more than {self.max_depth} deep (a recursion bomb)")
        for c in children:
            self.parented[c] = 1
        if depth > self.depth[target]:
            self.depth[target] = depth
            self.deepest = max(self.deepest, depth)

    def const(self, node: int, levels: int = 1) -> Any:
        """The node's constant value (tuples: their items, ``levels`` deep), else ``_UNKNOWN``."""
        value = self.values.get(node, _UNKNOWN)
        if value is _NONE:
            return None
        if isinstance(value, tuple):  # a tuple, a global or a storage
            if value[0] == "tuple" and levels > 0:
                return tuple(self.const(c, levels - 1) for c in value[1])
            return _UNKNOWN
        return value

    def name_of(self, node: int) -> str | None:
        value = self.values.get(node)
        return value[1] if isinstance(value, tuple) and value and value[0] == "global" else None

    # -- checks -------------------------------------------------------------------------------
    def see_global(self, name: str) -> None:
        self.globals.add(name)
        if name not in self.allowed and self.refused is None:
            self.refused = name  # raised where it is called, else at STOP (a bomb's size is the better message)

    def raise_refused(self) -> None:
        if self.refused is not None:
            raise PickleScanError(f"it asks to run '{self.refused}'", global_name=self.refused)

    def check_call(self, func: int, args: list[int]) -> None:
        name = self.name_of(func)
        if name is None:
            self.raise_refused()
            raise PickleScanError("it calls a value that is not a named function (a chained call)")
        if name in _SIZED_CALLS:
            sizes = [v for v in (self.const(a) for a in args) for v in (v if isinstance(v, tuple) else (v,))
                     if isinstance(v, int) and not isinstance(v, bool)]
            if any(abs(s) > self.max_alloc for s in sizes):
                raise PickleScanError(f"it asks {name} for {_size(max(abs(s) for s in sizes))} (limit "
                                      f"{_size(self.max_alloc)}; a memory bomb)", global_name=name)
        if name not in self.allowed:
            raise PickleScanError(f"it asks to run '{name}'", global_name=name)
        if name not in self.callable:
            raise PickleScanError(f"it asks to call '{name}', which checkpoints only name", global_name=name, called=True)
        if name == _REBUILD_TENSOR:
            self.check_tensor(args)

    def check_tensor(self, args: list[int]) -> None:
        """``_rebuild_tensor_v2(storage, offset, size, stride, ...)``: plain numbers, inside its storage."""
        value = self.values.get(args[0]) if len(args) == 1 else None
        parts = value[1] if isinstance(value, tuple) and value and value[0] == "tuple" else None
        if parts is None or not 4 <= len(parts) <= 7:
            raise PickleScanError("it rebuilds a tensor from arguments that are not a tuple "
                                  "(storage, offset, size, stride, ...)")
        if any(self.depth[p] > 1 for p in parts[6:]):  # torch sets a 7th argument's items as tensor attributes
            raise PickleScanError("it rebuilds a tensor with extra attributes (torch.save of a plain tensor has none)")
        storage = self.values.get(parts[0])
        offset, size, stride = (self.const(p) for p in parts[1:4])

        def ints(t: Any) -> bool:
            return isinstance(t, tuple) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in t)

        if not (isinstance(storage, tuple) and storage[0] == "storage" and isinstance(offset, int) and offset >= 0
                and ints(size) and ints(stride) and len(size) == len(stride)):
            raise PickleScanError("it rebuilds a tensor from arguments that are not a storage and non-negative sizes")
        numel = 1
        for s in size:
            numel *= s
        extent = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if numel else 0
        if numel > storage[2] or extent > storage[2]:
            raise PickleScanError(f"it rebuilds a tensor of {numel} elements (extent {extent}) over a storage of "
                                  f"{storage[2]} (a stride-0 or out-of-bounds view)")

    def persistent(self, pid: int) -> int:
        """``BINPERSID``: only ``('storage', <type>, key, location, numel[, None])``; records the bytes it claims."""
        parts = self.const(pid)
        want = 5 if self.zip_format else 6
        if not (isinstance(parts, tuple) and len(parts) == want and parts[0] in ("storage", b"storage")):
            raise PickleScanError(f"it holds a persistent id that is not a {want}-field torch storage reference")
        value = self.values.get(self.values[pid][1][1])  # the storage type: a GLOBAL node
        stype = value[1] if isinstance(value, tuple) and value and value[0] == "global" else None
        key, _location, numel = parts[2], parts[3], parts[4]
        if stype not in STORAGE_TYPES:
            self.raise_refused()
            raise PickleScanError(f"it names storage type {stype!r}, not a tensor storage")
        if not (isinstance(key, str) and isinstance(_location, str) and isinstance(numel, int)
                and not isinstance(numel, bool) and numel >= 0) or (not self.zip_format and parts[5] is not None):
            raise PickleScanError("it holds a storage reference with a bad key, location, size or view")
        nbytes = numel * STORAGE_TYPES[stype]
        self.storages[key] = max(nbytes, self.storages.get(key, 0))
        return self.new((pid,), ("storage", key, numel))

    # -- one pickle ---------------------------------------------------------------------------
    def stream(self, f: io.BytesIO) -> None:
        """Follow one pickle (up to its STOP) from ``f``'s position."""
        stack: list[int] = []
        marks: list[int] = []
        memo: dict[int, int] = {}
        try:
            for op, arg, pos in pickletools.genops(f):
                self.opcodes += 1
                if self.opcodes > self.max_opcodes:
                    raise PickleScanError(f"its pickles hold more than {self.max_opcodes} opcodes")
                self.step(op, arg, pos, stack, marks, memo)
        except PickleScanError:
            raise
        except ValueError as err:  # pickletools: unknown opcode, truncated argument, no STOP
            self.raise_refused()
            raise PickleScanError(f"its pickle is truncated or corrupt ({' '.join(str(err).split())[:120]})",
                                  malformed=True) from None
        self.raise_refused()
        if self.unsupported:
            raise PickleScanError(f"its pickle uses {self.unsupported}, which torch's weights-only loader does not read")

    def step(self, op: pickletools.OpcodeInfo, arg: Any, pos: int, stack: list[int], marks: list[int],
             memo: dict[int, int]) -> None:
        """One opcode's effect on the symbolic stack (``_MARK`` entries stand for MARK)."""
        name = op.name
        if name not in _TORCH_OPCODES and self.unsupported is None:
            self.unsupported = f"opcode {name} at byte {pos}"
        if name in _LEAVES:  # the common case, kept fast: a constant or an empty container
            value: Any = None
            if name == "NONE":
                value = _NONE
            elif name in ("NEWTRUE", "NEWFALSE"):
                value = name == "NEWTRUE"
            elif name == "EMPTY_TUPLE":
                value = ("tuple", ())
            elif isinstance(arg, int):  # also a huge integer: a size check must see it
                value = arg
            elif isinstance(arg, (str, bytes)) and len(arg) <= _SMALL:
                value = arg
            node = len(self.depth)
            self.depth.append(1)
            self.parented.append(0)
            if value is not None:
                self.values[node] = value
            stack.append(node)
            return
        floor = marks[-1] + 1 if marks else 0  # like the unpicklers, a MARK hides what lies below it

        def underflow() -> PickleScanError:
            return PickleScanError(f"its pickle is corrupt (stack underflow at {name}, byte {pos})", malformed=True)

        if name == "MARK":
            if len(marks) >= self.max_depth:  # each open MARK can become one more level of nesting
                raise PickleScanError(f"it nests containers more than {self.max_depth} deep (a recursion bomb)")
            marks.append(len(stack))
            stack.append(_MARK)
            return
        if name in ("PROTO", "FRAME"):
            return
        if name in _PUTS or name == "MEMOIZE":
            if len(stack) <= floor:
                raise underflow()
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            return
        if name in _GETS:
            if arg not in memo:
                raise PickleScanError(f"its pickle is corrupt (memo {arg} read before it is written)", malformed=True)
            stack.append(memo[arg])
            return
        if name == "DUP":
            if len(stack) <= floor:
                raise underflow()
            stack.append(stack[-1])
            return
        if name == "POP":  # pops the MARK itself when nothing lies above it (as pickle's load_pop does)
            if len(stack) > floor:
                stack.pop()
            elif marks:
                del stack[marks.pop():]
            else:
                raise underflow()
            return

        # The operands: everything above the last MARK for mark opcodes (plus the target below it), else len(stack_before).
        before = op.stack_before
        target = None
        if pickletools.markobject in before:
            if not marks:
                raise underflow()
            m = marks.pop()
            items = stack[m + 1:]
            del stack[m:]
            if before.index(pickletools.markobject):  # APPENDS, SETITEMS, ADDITEMS: the container below the MARK
                if len(stack) <= (marks[-1] + 1 if marks else 0):
                    raise underflow()
                target = stack[-1]
        else:
            start = len(stack) - len(before)
            if start < floor:
                raise underflow()
            items = stack[start:]
            del stack[start:]

        if name == "STOP":
            return
        if name in ("GLOBAL", "INST"):
            module, _, attr = arg.partition(" ")
            gname = _global_name(module, attr)
            self.see_global(gname)
            func = self.new(value=("global", gname))
            if name == "INST":
                self.check_call(func, [self.new(items, ("tuple", tuple(items)))])
                func = self.new(items)
            stack.append(func)
            return
        if name == "STACK_GLOBAL":
            module, attr = (self.const(i) for i in items)
            if not (isinstance(module, str) and isinstance(attr, str)):
                raise PickleScanError("its pickle names a global with non-string parts", malformed=True)
            gname = _global_name(module, attr)
            self.see_global(gname)
            stack.append(self.new(value=("global", gname)))
            return
        if name in _CALLS:  # REDUCE/NEWOBJ: [callable, args]; NEWOBJ_EX: [cls, args, kwargs]; OBJ: [cls, *args]
            args = [self.new(items[1:], ("tuple", tuple(items[1:])))] if name == "OBJ" else items[1:]
            self.check_call(items[0], args)
            stack.append(self.new(items, ("obj", self.name_of(items[0]))))
            return
        if name in _MUTATORS:
            if target is None:  # APPEND, SETITEM, BUILD: the container is the first operand and stays
                target, items = items[0], items[1:]
                stack.append(target)
            if name == "BUILD" and self.values.get(target) not in _BUILDABLE:
                # torch applies BUILD to a tensor as tensor.set_(*state): a view of any size, unchecked here
                raise PickleScanError("it sets an object's state with BUILD, which checkpoints only do for OrderedDicts")
            self.add_children(target, items)
            return
        if name == "BINPERSID":
            stack.append(self.persistent(items[0]))
            return
        if name == "PERSID":  # a string id: torch refuses it (unsupported opcode, reported at the end)
            stack.append(self.new())
            return
        if name == "READONLY_BUFFER":
            stack.extend(items)
            return
        if name == "POP_MARK":
            return
        if len(op.stack_after) != 1:  # every remaining opcode pushes exactly one value
            raise PickleScanError(f"its pickle uses opcode {name}, which the scan does not know", malformed=True)
        # TUPLE*, LIST, DICT, FROZENSET: a new container of the operands
        is_tuple = name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3") and len(items) <= _SMALL
        stack.append(self.new(items, ("tuple", tuple(items)) if is_tuple else None))


def _read_zip(path: Path, data_limit: int) -> tuple[bytes, dict[str, int]]:
    """``(data.pkl bytes, {record name: size})`` of a torch zip file, refusing what torch would not write."""
    with open(path, "rb") as fh:
        try:
            end = zipfile._EndRecData(fh)  # the directory's size, before ZipFile reads it all into memory
        except OSError:
            end = None
        if end is None:
            raise PickleScanError("it starts like a zip archive but has no zip directory (truncated?)", malformed=True)
        if end[zipfile._ECD_SIZE] > MAX_ZIP_DIRECTORY_BYTES:
            raise PickleScanError(f"its zip directory is {_size(end[zipfile._ECD_SIZE])} (limit "
                                  f"{_size(MAX_ZIP_DIRECTORY_BYTES)})")
        # Python's zipfile tolerates data before the archive (it shifts every offset); torch's reader does
        # not, so the two would read different records: the directory must end where the end record is.
        shift = end[zipfile._ECD_LOCATION] - end[zipfile._ECD_SIZE] - end[zipfile._ECD_OFFSET]
        if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:
            shift -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
        if shift:
            raise PickleScanError(f"its zip offsets are shifted by {shift} bytes (data before the archive: "
                                  "torch and Python's zipfile would read different records)")
        try:
            with zipfile.ZipFile(fh) as zf:
                infos = zf.infolist()
                if not infos:
                    raise PickleScanError("it is an empty zip archive", malformed=True)
                names = [i.filename for i in infos]
                if len(set(names)) != len(names):
                    raise PickleScanError("its zip archive holds two records with the same name")
                bad = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED or i.file_size != i.compress_size]
                if bad:  # torch stores records uncompressed; an inflated record could be a zip bomb
                    raise PickleScanError(f"its zip record '{bad[0]}' is compressed (torch.save never compresses)")
                prefix = names[0].split("/", 1)[0]  # torch's reader takes the archive name from the first record
                pkl = zf.getinfo(f"{prefix}/data.pkl") if f"{prefix}/data.pkl" in names else None
                if pkl is None:
                    raise PickleScanError("it is a zip archive without the data.pkl of a torch checkpoint", malformed=True)
                if pkl.file_size > data_limit:
                    raise PickleScanError(f"its data.pkl is {_size(pkl.file_size)} (limit {_size(data_limit)})")
                data = zf.read(pkl)
                sizes = {n[len(prefix) + 1:]: i.file_size for n, i in zip(names, infos) if n.startswith(prefix + "/")}
        except zipfile.BadZipFile as err:
            cause = " ".join(str(err).split())[:120]
            raise PickleScanError(f"its zip archive is corrupt ({cause})", malformed=True) from None
    return data, sizes


def scan_checkpoint(
    path: str | os.PathLike[str],
    *,
    max_file_bytes: int,
    allowed_globals: Iterable[str] = CHECKPOINT_GLOBALS,
    callable_globals: Iterable[str] = CALLABLE_GLOBALS,
    max_pickle_bytes: int | None = None,
    max_opcodes: int | None = None,
    max_depth: int | None = None,
    max_alloc_bytes: int | None = None,
) -> ScanReport:
    """Refuse a torch checkpoint whose pickles would run code, exhaust memory or recursion, before ``torch.load``.

    Refused: files over ``max_file_bytes``; globals outside ``allowed_globals`` (calls outside
    ``callable_globals``); opcodes torch's weights-only loader does not read; nesting deeper
    than ``max_depth`` or reference cycles; ``bytes``/``bytearray`` sizes over
    ``max_alloc_bytes``; storages claiming more bytes than the file holds for them; tensors
    larger than their storage; compressed or duplicate zip records. Memory stays in
    proportion to the pickle (at most ``max_pickle_bytes``), never to what it claims.
    The ``None`` knobs default to this module's constants, read at call time.

    Raises:
        PickleScanError: the cause, on one line, without the path (callers name the file).
        OSError: the file cannot be read.
    """
    path = Path(path)
    max_pickle_bytes = MAX_PICKLE_BYTES if max_pickle_bytes is None else max_pickle_bytes
    scan = _Scan(
        zip_format=False,
        allowed=frozenset(allowed_globals),
        callable_=frozenset(callable_globals),
        max_depth=MAX_DEPTH if max_depth is None else max_depth,
        max_opcodes=MAX_OPCODES if max_opcodes is None else max_opcodes,
        max_alloc=MAX_ALLOC_BYTES if max_alloc_bytes is None else max_alloc_bytes,
    )
    size = path.stat().st_size
    if size > max_file_bytes:
        raise PickleScanError(f"it is {_size(size)} ({size} bytes), over the {_size(max_file_bytes)} limit "
                              "for this kind of file")
    if size == 0:
        raise PickleScanError("it is empty", malformed=True)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == b"PK\x03\x04":  # what torch.load checks to pick the zip reader
        scan.zip_format = True
        data, records = _read_zip(path, max_pickle_bytes)
        scan.stream(io.BytesIO(data))
        for key, nbytes in scan.storages.items():
            have = records.get(f"data/{key}")
            if have is None:
                raise PickleScanError(f"it references storage '{key}' but has no data/{key} record", malformed=True)
            if nbytes > have:
                raise PickleScanError(f"its storage '{key}' claims {_size(nbytes)} but its record holds {_size(have)}")
        fmt = "zip"
    else:
        with open(path, "rb") as fh:
            head = fh.read(min(size, max_pickle_bytes))
        f = io.BytesIO(head)
        for i in range(5):
            try:
                scan.stream(f)
            except PickleScanError as err:
                ran_out = err.malformed and f.tell() >= len(head)
                if ran_out and len(head) < size:
                    raise PickleScanError(f"its pickles are longer than the {_size(max_pickle_bytes)} limit") from None
                if ran_out and i:
                    raise PickleScanError(f"it ends after {i} of the 5 pickles of a torch.save file",
                                          malformed=True) from None
                raise
        need = sum(scan.storages.values()) + 8 * len(scan.storages)
        if need > size - f.tell():
            raise PickleScanError(f"its tensors need {_size(need)} but only {_size(size - f.tell())} follow its pickles",
                                  malformed=True)
        fmt = "legacy"
    report = ScanReport(fmt, frozenset(scan.globals), len(scan.storages), sum(scan.storages.values()), scan.deepest,
                        scan.opcodes)
    logger.debug("scanned %s: %s", path, report)
    return report
