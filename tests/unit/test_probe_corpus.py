"""A probe corpus of malicious and malformed checkpoints (generated here, no blobs committed), through every loader.

Each probe is one file (a legacy or zip torch pickle, a Lightning ``.ckpt``, a ``.safetensors``
export) that tries to run code, exhaust memory or recursion, or is simply broken. Every payload
that ran would create a marker file. For each file and each loader that reads its suffix
(the legacy reader for ``.pt``; ``load_classifier`` for all three; train's ``_resolve_ckpt``
for ``.ckpt``) the test asserts: refused with the project's user-error type (a ValueError),
one line, naming the file, no marker, and bounded peak-RSS growth. A few of the worst probes
also go through the real command lines (exit 2, one error line, no traceback).

Existing single cases live in test_malformed_files.py and test_legacy_import.py; this file adds
the corpus (protocols 0-5, indirect calls, persistent ids, zip tricks, bombs).
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import robustx
from jobs.loading import CheckpointError, load_classifier
from jobs.train import _resolve_ckpt
from robustx.io import pickle_scan
from robustx.io.export import ExportError
from robustx.io.legacy import LegacyCheckpointError, import_reference_checkpoint
from robustx.models import SmallCNN

from tests.helpers import needs_fmnist, run_script
from tests.paths import FMNIST, ROOT

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

CFG = {"_target_": "robustx.models.SmallCNN", "channels": [4, 4, 4], "hidden": 8}
RSS_LIMIT_MB = 300
N_DEEP = 100_000  # nesting of the recursion bombs
BIG = 2**31  # elements claimed by the memory bombs (8 GiB of float32)

# ---------------------------------------------------------------------------------------------
# Raw protocol-2 opcodes (what torch.save writes), to build what pickle.dumps cannot.

P2, STOP = b"\x80\x02", b"."


def g(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def u(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def i(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def t(*parts: bytes) -> bytes:
    return b"(" + b"".join(parts) + b"t"


def call(func: bytes, *args: bytes) -> bytes:
    return func + (t(*args) if args else b")") + b"R"


def d(**items: bytes) -> bytes:
    return b"}" + (b"(" + b"".join(u(k) + v for k, v in items.items()) + b"u" if items else b"")


def f(x: float) -> bytes:
    return b"G" + struct.pack(">d", x)


OFFSET = u("input_offset") + t(t(f(0.5), f(0.5), f(0.5)), t(f(0.25), f(0.25), f(0.25)))


def storage(key: str = "0", numel: int = 4, legacy: bool = True, stype: bytes = g("torch", "FloatStorage")) -> bytes:
    return t(u("storage"), stype, u(key), u("cpu"), i(numel), *([b"N"] if legacy else [])) + b"Q"


def tensor(st: bytes, offset: int = 0, size: tuple = (4,), stride: tuple = (1,), extra: bytes = b"") -> bytes:
    return call(g("torch._utils", "_rebuild_tensor_v2"), st, i(offset), t(*map(i, size)), t(*map(i, stride)), b"\x89",
                call(g("collections", "OrderedDict")), *([extra] if extra else []))


MAGIC = 0x1950A86A20F9469CFC6C


def legacy_file(body: bytes, storages: dict[str, bytes] | None = None) -> bytes:
    """A legacy torch.save file around the object pickle ``body`` (opcodes without PROTO/STOP)."""
    storages = {"0": bytes(16)} if storages is None else storages
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    raw = b"".join(struct.pack("<q", len(v) // 4) + v for v in storages.values())
    return (pickle.dumps(MAGIC, 2) + pickle.dumps(1001, 2) + pickle.dumps(sys_info, 2) + P2 + body + STOP
            + pickle.dumps(list(storages), 2) + raw)


def authors(arch: bytes = None, params: bytes = None, extra: bytes = b"", zip_format: bool = False) -> bytes:
    """The object pickle of an authors'-like checkpoint: {'model_params': {...}, 'training_options': {...}}."""
    arch = arch if arch is not None else t(i(32), b"N", t(i(1), i(1), i(1)), t(i(4), i(4), i(4)), i(10))
    params = params if params is not None else d(w=tensor(storage(legacy=not zip_format)))
    return d(model_params=params, training_options=b"}(" + u("arch") + arch + OFFSET + extra + b"u")


def stride0(zip_format: bool = False) -> bytes:
    """A (2, 2**31) view of one float: torch.load accepts it; .tolist() or a copy would need 32 GB."""
    return tensor(storage(numel=1, legacy=not zip_format), size=(2, BIG), stride=(0, 0))


_TEMPLATE: dict[str, bytes] = {}


def zip_file(data_pkl: bytes, records: dict[str, bytes] | None = None, *, compress: bool = False,
             names: dict[str, str] | None = None, extra: list[tuple[str, bytes]] = ()) -> bytes:
    """A torch zip file: the records of a real torch.save, with ``data.pkl`` and ``data/<key>`` replaced."""
    if not _TEMPLATE:
        buf = io.BytesIO()
        torch.save({"w": torch.zeros(4)}, buf)
        with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
            _TEMPLATE.update({n.split("/", 1)[1]: zf.read(n) for n in zf.namelist()})
    recs = {k: v for k, v in _TEMPLATE.items() if not k.startswith("data")}
    recs["data.pkl"] = data_pkl
    recs.update({f"data/{k}": v for k, v in ({"0": bytes(16)} if records is None else records).items()})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        for name in ["data.pkl", *sorted(set(recs) - {"data.pkl"})]:
            zf.writestr((names or {}).get(name, f"archive/{name}"), recs[name])
        for name, data in extra:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Duplicate name": the point of one probe
                zf.writestr(name, data)
    return out.getvalue()


def torch_bytes(obj, zip_format: bool = True) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


def safetensors_file(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def export_bytes(config=None, meta: dict | None = None, dtype=None) -> bytes:
    """A save_model-style export of a tiny SmallCNN (same header keys), its model_config, metadata or dtype changed."""
    from safetensors.torch import save

    torch.manual_seed(0)
    tensors = {k: v.contiguous() for k, v in SmallCNN(channels=(4, 4, 4), hidden=8).state_dict().items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    config = CFG if config is None else config
    metadata = {"format": "robustx", "robustx_version": robustx.__version__,
                "model_config": config if isinstance(config, str) else json.dumps(config), **(meta or {})}
    return save(tensors, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Payloads: each, if it ever ran, would create the marker file.


class Reduce:
    """Pickles as ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class SetState:
    """A class whose __setstate__ runs the command (the probe names it by GLOBAL, then NEWOBJ + BUILD)."""

    def __setstate__(self, state):  # pragma: no cover - must never run
        os.system(state["cmd"])


def shell(m: Path) -> str:
    return f"touch {m}"


def py(m: Path) -> str:
    return f"__import__('os').system('touch {m}')"


def _call_cmd(func: bytes, m: Path) -> bytes:
    """``func(cmd)`` where ``func`` is an opcode expression yielding os.system."""
    return P2 + func + t(u(shell(m))) + b"R" + STOP


_IMPORT_OS = call(g("builtins", "__import__"), u("os"))


def deep_lists(n: int = N_DEEP) -> bytes:
    return b"]" * n + b"a" * (n - 1)


def deep_dicts(n: int = N_DEEP) -> bytes:
    return b"}" + (u("k") + b"}") * (n - 1) + b"s" * (n - 1)


def deep_tuples(n: int = N_DEEP) -> bytes:
    return b"N" + b"\x85" * n


def top_down_lists(n: int = 2_000) -> bytes:
    """Nesting with a constant stack: each new list appended into the previous one, fetched from the memo."""
    out = b"]r" + struct.pack("<I", 0)
    for k in range(1, n):
        out += b"j" + struct.pack("<I", k - 1) + b"]r" + struct.pack("<I", k) + b"a0"
    return out


@dataclass(frozen=True)
class Probe:
    name: str
    category: str
    suffixes: tuple[str, ...]
    build: Callable[[Path], bytes | None]  # marker path -> file bytes
    resume: bool = True  # whether train's _resolve_ckpt must refuse the .ckpt (False: a loadable training ckpt)


PICKLE = (".pt", ".ckpt")  # a bare pickle or torch file: both pickle-reading suffixes
PROBES: list[Probe] = []


def probe(name: str, category: str, suffixes=PICKLE, resume: bool = True):
    def register(build):
        PROBES.append(Probe(name, category, tuple(suffixes), build, resume))
        return build
    return register


# -- code execution --------------------------------------------------------------------------
for _proto in range(6):
    probe(f"os_system_protocol{_proto}", "code")(
        functools.partial(lambda m, p: pickle.dumps(Reduce(os.system, shell(m)), protocol=p), p=_proto))
for _proto in (2, 4):
    probe(f"eval_protocol{_proto}", "code")(functools.partial(lambda m, p: pickle.dumps(Reduce(eval, py(m)), protocol=p), p=_proto))
probe("exec", "code")(lambda m: pickle.dumps(Reduce(exec, f"import os; os.system('touch {m}')"), protocol=2))
probe("subprocess_popen_p2", "code")(lambda m: pickle.dumps(Reduce(subprocess.Popen, ["touch", str(m)]), protocol=2))
probe("subprocess_popen_p5", "code")(lambda m: pickle.dumps(Reduce(subprocess.Popen, ["touch", str(m)]), protocol=5))
probe("functools_partial", "code")(lambda m: pickle.dumps(Reduce(functools.partial(os.system, shell(m))), protocol=2))
probe("operator_attrgetter", "code")(lambda m: _call_cmd(call(call(g("operator", "attrgetter"), u("system")), _IMPORT_OS), m))
probe("builtins_getattr", "code")(lambda m: _call_cmd(call(g("builtins", "getattr"), _IMPORT_OS, u("system")), m))
probe("py2_builtin_name", "code")(lambda m: P2 + call(g("__builtin__", "eval"), u(py(m))) + STOP)
probe("inst_opcode", "code")(lambda m: f"(S'{shell(m)}'\nios\nsystem\n.".encode())
probe("obj_opcode", "code")(lambda m: f"(cos\nsystem\nS'{shell(m)}'\no.".encode())
probe("newobj_popen", "code")(lambda m: P2 + g("subprocess", "Popen") + t(t(u("touch"), u(str(m)))) + b"\x81" + STOP)
probe("setstate_class", "code")(lambda m: P2 + g(SetState.__module__, "SetState") + b")\x81" + d(cmd=u(shell(m))) + b"b" + STOP)
probe("build_names_os_system", "code")(
    lambda m: P2 + call(g("collections", "OrderedDict")) + b"}" + u("__setstate__") + g("os", "system") + b"sb" + STOP)
probe("torch_load_global", "code")(lambda m: P2 + call(g("torch", "load"), u(str(m))) + STOP)
probe("persid_module", "code")(lambda m: legacy_file(t(u("module"), g("os", "system"), u("x"), u(shell(m))) + b"Q"))
probe("persid_storage_type_os_system", "code")(lambda m: legacy_file(tensor(storage(stype=g("os", "system")))))
probe("persid_int", "code")(lambda m: legacy_file(i(0) + b"Q"))
probe("persid_string", "code")(lambda m: legacy_file(b"P" + shell(m).encode() + b"\n"))
probe("rebuild_tensor_with_os_system", "code")(
    lambda m: legacy_file(call(g("torch._utils", "_rebuild_tensor_v2"), g("os", "system"), i(0), t(i(1)), t(i(1)))))
probe("evil_inside_legacy_checkpoint", "code", (".pt",))(
    lambda m: torch_bytes({"model_params": {"w": torch.zeros(2)}, "training_options": {"arch": Reduce(os.system, shell(m))}},
                          zip_format=False))
probe("evil_torch_save_zip", "code")(lambda m: torch_bytes({"state_dict": {}, "x": Reduce(os.system, shell(m))}))

# -- torch zip tricks --------------------------------------------------------------------------
probe("zip_evil_data_pkl", "zip")(lambda m: zip_file(pickle.dumps(Reduce(os.system, shell(m)), protocol=2)))
probe("zip_compressed_evil", "zip")(lambda m: zip_file(pickle.dumps(Reduce(os.system, shell(m)), protocol=2), compress=True))
probe("zip_duplicate_data_pkl", "zip")(
    lambda m: zip_file(pickle.dumps({"ok": 1}, 2), extra=[("archive/data.pkl", pickle.dumps(Reduce(os.system, shell(m)), 2))]))
probe("zip_other_prefix", "zip")(
    lambda m: zip_file(pickle.dumps(Reduce(os.system, shell(m)), 2), extra=[("other/data.pkl", pickle.dumps({}, 2))]))
probe("zip_prepended_archive", "zip")(  # zipfile shifts offsets past prepended data, torch's reader does not
    lambda m: b"PK\x03\x04" + bytes(60) + zip_file(pickle.dumps(Reduce(os.system, shell(m)), 2)))
probe("zip_no_data_pkl", "zip")(lambda m: zip_file(b"", names={"data.pkl": "archive/nothing.pkl"}))
probe("zip_truncated", "zip")(lambda m: zip_file(P2 + tensor(storage(legacy=False)) + STOP)[:-30])
probe("zip_storage_bomb", "zip")(lambda m: zip_file(P2 + tensor(storage(numel=BIG, legacy=False)) + STOP))
probe("zip_missing_storage_record", "zip")(lambda m: zip_file(P2 + tensor(storage("7", legacy=False)) + STOP))
probe("zip_stride0_view", "zip")(
    lambda m: zip_file(P2 + authors(params=d(input_offset=stride0(zip_format=True)), zip_format=True) + STOP, {"0": bytes(4)}))

# -- _rebuild_tensor_v2 arguments ------------------------------------------------------------
probe("tensor_stride0_bomb", "tensor")(lambda m: legacy_file(authors(params=d(input_offset=stride0())), {"0": bytes(4)}))
probe("tensor_offset_out_of_bounds", "tensor")(lambda m: legacy_file(tensor(storage(), offset=10**6)))
probe("tensor_negative_size", "tensor")(lambda m: legacy_file(tensor(storage(), size=(-4,))))
probe("tensor_chained_args", "tensor")(
    lambda m: legacy_file(g("torch._utils", "_rebuild_tensor_v2") + call(g("collections", "OrderedDict")) + b"R"))
probe("tensor_extra_attributes", "tensor")(lambda m: legacy_file(tensor(storage(), extra=d(__class__=b"N"))))
probe("build_on_tensor", "tensor")(lambda m: legacy_file(authors(params=d(
    input_offset=tensor(storage()) + t(storage(), i(0), t(i(2), i(BIG)), t(i(0), i(0))) + b"b"))))

# -- memory bombs ----------------------------------------------------------------------------
probe("bytearray_2GiB", "memory")(lambda m: P2 + call(g("builtins", "bytearray"), i(2**30)) + STOP)
probe("bytearray_in_legacy_checkpoint", "memory", (".pt",))(
    lambda m: legacy_file(authors(extra=u("x") + call(g("builtins", "bytearray"), i(2**30)))))
probe("bytes_2GiB", "memory")(lambda m: P2 + call(g("builtins", "bytes"), i(2**30)) + STOP)
probe("legacy_storage_bomb", "memory")(lambda m: legacy_file(authors(params=d(w=tensor(storage(numel=BIG))))))
probe("legacy_storage_short", "memory")(lambda m: legacy_file(authors(params=d(w=tensor(storage(numel=4)))), {"0": bytes(8)}))
probe("unicode_length_4GiB", "memory")(lambda m: P2 + b"X" + struct.pack("<I", 2**32 - 1) + b"abc")
probe("opcode_flood", "memory", (".pt",))(lambda m: P2 + b"](" + b"N" * 600_000 + b"e" + STOP)
probe("legacy_over_size_cap", "memory", (".pt",))(lambda m: None)  # written sparse, see _write
probe("ckpt_over_size_cap", "memory", (".ckpt",))(lambda m: None)

# -- recursion bombs -------------------------------------------------------------------------
probe("deep_lists", "recursion")(lambda m: P2 + deep_lists() + STOP)
probe("deep_dicts", "recursion")(lambda m: P2 + deep_dicts() + STOP)
probe("deep_tuples", "recursion")(lambda m: P2 + deep_tuples() + STOP)
probe("deep_marks", "recursion")(lambda m: P2 + b"(" * N_DEEP + b"N" + STOP)
probe("top_down_memo_nesting", "recursion")(lambda m: P2 + top_down_lists() + STOP)
probe("self_cycle", "recursion")(lambda m: P2 + b"]q\x00h\x00a" + STOP)
probe("deep_arch_in_legacy_checkpoint", "recursion", (".pt",))(lambda m: legacy_file(authors(arch=deep_lists())))
probe("deep_tuple_arch_in_legacy_checkpoint", "recursion", (".pt",))(lambda m: legacy_file(authors(arch=deep_tuples())))
probe("cycle_arch_in_legacy_checkpoint", "recursion", (".pt",))(
    lambda m: legacy_file(authors(arch=b"]r" + struct.pack("<I", 999) + b"j" + struct.pack("<I", 999) + b"a")))
probe("deep_hparams_in_ckpt", "recursion", (".ckpt",))(lambda m: zip_file(
    P2 + d(state_dict=b"}", model_config=d(_target_=u("robustx.models.SmallCNN")), optimizer_states=b"]",
           lr_schedulers=b"]", hyper_parameters=deep_dicts()) + STOP))

# -- legacy checkpoints that describe another network ---------------------------------------
probe("legacy_negative_width", "legacy", (".pt",))(lambda m: legacy_file(authors(
    arch=t(i(32), b"N", t(i(1), i(1), i(1)), t(i(-4), i(4), i(4)), i(10)), 
    params=d(a=tensor(storage("0")), b=tensor(storage("1")), c=tensor(storage("2")))),
    {"0": bytes(16), "1": bytes(16), "2": bytes(16)}))
probe("legacy_huge_width", "legacy", (".pt",))(lambda m: legacy_file(authors(
    arch=t(i(32), b"N", t(i(1), i(1), i(1)), t(i(2**20), i(2**20), i(2**20)), i(10)), 
    params=d(a=tensor(storage("0")), b=tensor(storage("1")), c=tensor(storage("2")))),
    {"0": bytes(16), "1": bytes(16), "2": bytes(16)}))
probe("legacy_many_blocks", "legacy", (".pt",))(lambda m: legacy_file(authors(
    arch=t(i(32), b"N", t(i(10**6), i(10**6), i(10**6)), t(i(4), i(4), i(4)), i(10)))))

# -- safetensors -----------------------------------------------------------------------------
probe("st_target_os_system", "safetensors", (".safetensors",))(
    lambda m: export_bytes({"_target_": "os.system", "command": shell(m)}))
probe("st_target_eval", "safetensors", (".safetensors",))(lambda m: export_bytes({"_target_": "builtins.eval", "source": py(m)}))
probe("st_huge_shape", "safetensors", (".safetensors",))(
    lambda m: safetensors_file({"w": {"dtype": "F32", "shape": [BIG, BIG], "data_offsets": [0, 4]},
                                "__metadata__": {"model_config": json.dumps(CFG)}}, bytes(4)))
probe("st_int32_weights", "safetensors", (".safetensors",))(lambda m: export_bytes(dtype=torch.int32))
probe("st_negative_width", "safetensors", (".safetensors",))(lambda m: export_bytes({**CFG, "channels": [-4, 4, 4]}))
probe("st_huge_width", "safetensors", (".safetensors",))(lambda m: export_bytes({**CFG, "hidden": 10**9}))
probe("st_deep_model_config", "safetensors", (".safetensors",))(
    lambda m: export_bytes('{"_target_": "robustx.models.SmallCNN", "x": ' + "[" * N_DEEP + "]" * N_DEEP + "}"))
probe("st_deep_extra_metadata", "safetensors", (".safetensors",))(lambda m: export_bytes(meta={"notes": "[" * N_DEEP + "]" * N_DEEP}))
probe("st_config_not_dict", "safetensors", (".safetensors",))(lambda m: export_bytes([1, 2, 3]))
probe("st_header_length_2e60", "safetensors", (".safetensors",))(lambda m: struct.pack("<Q", 2**60) + b"{}")
probe("st_empty", "safetensors", (".safetensors",))(lambda m: b"")
probe("st_truncated", "safetensors", (".safetensors",))(lambda m: export_bytes()[:-100])

# -- Lightning .ckpt ---------------------------------------------------------------------------
_SD = {f"model.{k}": v for k, v in SmallCNN(channels=(4, 4, 4), hidden=8).state_dict().items()}
_GOOD = {"state_dict": _SD, "model_config": CFG, "optimizer_states": [], "lr_schedulers": [], "epoch": 0}
probe("ckpt_evil_callback_state", "lightning", (".ckpt",))(
    lambda m: torch_bytes({**_GOOD, "callbacks": {"ModelCheckpoint": {"best": Reduce(os.system, shell(m))}}}))
probe("ckpt_evil_hparams", "lightning", (".ckpt",))(lambda m: torch_bytes({**_GOOD, "hyper_parameters": {"lr": Reduce(eval, py(m))}}))
probe("ckpt_list", "lightning", (".ckpt",))(lambda m: torch_bytes([1, 2, 3]))
probe("ckpt_tensor", "lightning", (".ckpt",))(lambda m: torch_bytes(torch.zeros(3)))
probe("ckpt_no_state_dict", "lightning", (".ckpt",))(lambda m: torch_bytes({"model_config": CFG}))
probe("ckpt_state_dict_list", "lightning", (".ckpt",))(lambda m: torch_bytes({**_GOOD, "state_dict": [1]}))
probe("ckpt_weights_only_no_model_config", "lightning", (".ckpt",))(lambda m: torch_bytes({"state_dict": _SD}))
probe("ckpt_target_os_system", "lightning", (".ckpt",), resume=False)(
    lambda m: torch_bytes({**_GOOD, "model_config": {"_target_": "os.system", "command": shell(m)}}))
probe("ckpt_truncated", "lightning", (".ckpt",))(lambda m: torch_bytes(_GOOD)[:1000])
probe("ckpt_empty", "lightning", (".ckpt",))(lambda m: b"")


def _write(p: Probe, path: Path, marker: Path) -> None:
    data = p.build(marker)
    if data is None:  # over the size cap: a sparse file, no disk used
        with open(path, "wb") as fh:
            fh.truncate((pickle_scan.LEGACY_MAX_BYTES if path.suffix == ".pt" else pickle_scan.CKPT_MAX_BYTES) + 1)
        return
    path.write_bytes(data)


def _legacy(path: Path):
    return import_reference_checkpoint(path)


def _resume(path: Path):
    return _resolve_ckpt(str(path))


LOADERS = {
    ".pt": [("legacy", _legacy, (LegacyCheckpointError,)), ("load_classifier", load_classifier, (LegacyCheckpointError,))],
    ".ckpt": [("load_classifier", load_classifier, (CheckpointError,)), ("_resolve_ckpt", _resume, (ValueError,))],
    ".safetensors": [("load_classifier", load_classifier, (CheckpointError, ExportError))],
}


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


STATS: dict[str, dict] = {}  # probe:loader -> category, peak RSS growth, message (for a summary; not asserted)


def test_the_corpus_is_big_enough():
    assert 60 <= len(PROBES) <= 100 and len({p.name for p in PROBES}) == len(PROBES)


@pytest.mark.parametrize("p", PROBES, ids=lambda p: p.name)
def test_probe_is_refused_in_one_line_without_running_code(p, tmp_path):
    marker = tmp_path / "MARKER"
    for suffix in p.suffixes:
        path = tmp_path / f"probe_{p.name}{suffix}"
        _write(p, path, marker)
        for loader, fn, errors in LOADERS[suffix]:
            if loader == "_resolve_ckpt" and not p.resume:
                continue
            measured = _reset_peak()
            before = _status_kb("VmRSS")
            with pytest.raises(ValueError) as info:
                fn(path)
            grown_mb = (_status_kb("VmHWM") - before) / 1024 if measured else 0.0
            err, msg = info.value, str(info.value)
            where = f"{p.name}{suffix} via {loader}: {type(err).__name__}: {msg[:300]}"
            assert isinstance(err, errors), where
            assert "\n" not in msg and path.name in msg, where
            assert not marker.exists(), where
            assert grown_mb < RSS_LIMIT_MB, f"{where} (peak RSS grew {grown_mb:.0f} MB)"
            STATS[f"{p.name}{suffix}:{loader}"] = {"category": p.category, "rss_mb": grown_mb, "message": msg}


def test_probes_are_refused_by_the_scan_before_torch_load(tmp_path, monkeypatch):
    """The bombs never reach torch.load: the opcode scan refuses them first."""
    def no_load(*args, **kwargs):
        raise AssertionError("torch.load reached")

    monkeypatch.setattr(torch, "load", no_load)
    names = ["bytearray_2GiB", "bytearray_in_legacy_checkpoint", "legacy_storage_bomb", "zip_storage_bomb",
             "top_down_memo_nesting", "cycle_arch_in_legacy_checkpoint", "tensor_stride0_bomb", "zip_stride0_view",
             "build_on_tensor", "zip_duplicate_data_pkl", "deep_tuple_arch_in_legacy_checkpoint"]
    for p in (p for p in PROBES if p.name in names):
        for suffix in p.suffixes:
            path = tmp_path / f"{p.name}{suffix}"
            _write(p, path, tmp_path / "MARKER")
            with pytest.raises(pickle_scan.PickleScanError):
                pickle_scan.scan_checkpoint(path, max_file_bytes=pickle_scan.CKPT_MAX_BYTES)


def test_real_checkpoints_pass_the_scan(tmp_path):
    """What this project writes (a Lightning-like ckpt, legacy and zip torch.save) passes, and the limits are far off."""
    sd = SmallCNN(channels=(4, 4, 4), hidden=8).state_dict()
    opt = torch.optim.Adam(SmallCNN(channels=(4, 4, 4), hidden=8).parameters())
    ckpt = {**_GOOD, "optimizer_states": [opt.state_dict()], "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {
        "total": {"ready": 1}}}}, "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_k_models": {}}},
        "hyper_parameters": {"model": CFG, "method": {"eps": [0.1, 0.2]}}, "torch_rng_state": torch.get_rng_state()}
    for name, data in (("a.ckpt", torch_bytes(ckpt)), ("b.ckpt", torch_bytes(ckpt, zip_format=False)),
                       ("c.pt", torch_bytes({"model_params": sd}, zip_format=False))):
        (tmp_path / name).write_bytes(data)
        report = pickle_scan.scan_checkpoint(tmp_path / name, max_file_bytes=pickle_scan.CKPT_MAX_BYTES)
        assert report.max_depth < pickle_scan.MAX_DEPTH // 4 and report.opcodes < pickle_scan.MAX_OPCODES // 50
    model, info = load_classifier(tmp_path / "a.ckpt")
    assert info["format"] == "lightning" and _resolve_ckpt(str(tmp_path / "a.ckpt")) == str(tmp_path / "a.ckpt")


# ---------------------------------------------------------------------------------------------
# Through the real command lines: exit 2, one error line naming the file, no traceback, no marker.

def _one(tmp_path: Path, name: str, suffix: str, marker: Path) -> Path:
    (p,) = [p for p in PROBES if p.name == name]
    path = tmp_path / f"{name}{suffix}"
    _write(p, path, marker)
    return path


def _assert_one_line_refusal(proc: subprocess.CompletedProcess, path: Path, marker: Path, rc: int = 2) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == rc, out[-2000:]
    assert "Traceback" not in out, out[-2000:]
    errors = [ln for ln in out.splitlines() if path.name in ln and ("Error" in ln or "refus" in ln)]
    assert len(errors) == 1, out[-2000:]
    assert not marker.exists()


def test_legacy_cli_refuses_the_worst_probes(tmp_path):
    """The converter logs one line per refused file (and a count) and exits 2, the entry points' user-error code."""
    marker = tmp_path / "MARKER"
    names = ["bytearray_2GiB", "deep_lists", "os_system_protocol5", "legacy_storage_bomb", "tensor_stride0_bomb"]
    paths = [_one(tmp_path, n, ".pt", marker) for n in names]
    proc = subprocess.run([sys.executable, "-m", "robustx.io.legacy", *map(str, paths), "--out", str(tmp_path / "out")],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-2000:]
    for path in paths:
        assert sum(path.name in ln for ln in out.splitlines()) == 1, out[-2000:]
    assert f"{len(paths)} of {len(paths)} checkpoints failed" in out and not marker.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
@needs_fmnist
@pytest.mark.parametrize("script, name, suffix", [("eval.py", "legacy_storage_bomb", ".pt"),
                                                  ("explain.py", "zip_storage_bomb", ".ckpt")])
def test_eval_and_explain_cli_refuse_a_bomb(tmp_path, script, name, suffix):
    marker = tmp_path / "MARKER"
    path = _one(tmp_path, name, suffix, marker)
    args = [f"ckpt={path}", "data=fashion_mnist", f"data.root={FMNIST}"] if script == "eval.py" else [
        f"ckpt={path}", f"images=[{ROOT / 'examples' / 'images' / 'cat.jpg'}]", "threads=1"]
    proc = run_script(script, tmp_path, *args, env={"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}, check=False, timeout=300)
    _assert_one_line_refusal(proc, path, marker)


@pytest.mark.slow
@needs_fmnist
def test_train_cli_refuses_a_bomb_as_ckpt_path(tmp_path):
    marker = tmp_path / "MARKER"
    path = _one(tmp_path, "deep_hparams_in_ckpt", ".ckpt", marker)
    proc = run_script("train.py", tmp_path, "+experiment=demo", "logger=none", f"data.root={FMNIST}", f"ckpt_path={path}",
                      env={"OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}, check=False, timeout=300)
    _assert_one_line_refusal(proc, path, marker)
