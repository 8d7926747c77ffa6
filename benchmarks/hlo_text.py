"""Optimised HLO text as data: value shapes and bytes, computations and their instructions,
attributes, and the Python stack frames XLA prints for each op. What a program runs and costs
is read from these by ``hlo.py`` (kernels, FLOPs: ``hlo_flops.py``, bytes: ``hlo_bytes.py``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b(pred|[su](?:4|8|16|32|64)|bf16|f16|f32|f64|f8e4m3fn|f8e5m2)"
                    r"\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$")
# no kernel of their own
FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call",
         "conditional", "after-all", "partition-id", "replica-id", "opt-barrier",
         "async-done", "async-update", "copy-done", "send-done", "recv-done", "domain",
         "add-dependency"}


def result_type(rhs: str) -> tuple[str, str]:
    """(result type text, rest) of an instruction's right-hand side: a tuple type
    ``(f32[2], s32[])`` or a single ``f32[2,3]{1,0}``."""
    if rhs.startswith("("):
        depth = 0
        for i, ch in enumerate(rhs):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rhs[: i + 1], rhs[i + 1:].lstrip()
    head, _, rest = rhs.partition(" ")
    return head, rest


def shapes_in(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(text)]


def nbytes(shapes) -> float:
    return float(sum(_DTYPE_BYTES[dt] * int(np.prod(d)) for dt, d in shapes))


def hlo_shapes(hlo_text: str) -> Counter:
    """(dtype, dims) of every value an instruction of the HLO produces, counted."""
    out: Counter = Counter()
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            out.update(shapes_in(result_type(m.group(2))[0]))
    return out


@dataclass
class Instr:
    name: str
    op: str
    shapes: list  # result leaves
    operands: list[str]
    attrs: str
    param_index: int = -1  # parameter(i)
    frame: int = 0  # metadata stack_frame_id (0: none); see hlo_moe.stack_frames
    op_name: str = ""  # metadata op_name: the JAX name stack


@dataclass
class Computation:
    name: str
    entry: bool
    instrs: list[Instr] = field(default_factory=list)


def parse_module(hlo_text: str) -> dict[str, Computation]:
    comps: dict[str, Computation] = {}
    cur = None
    for line in hlo_text.splitlines():
        h = _HEADER.match(line)
        if h and "=" not in line.split("(")[0]:
            cur = comps.setdefault(h.group(2), Computation(h.group(2), bool(h.group(1))))
            continue
        m = _INSTR.match(line)
        if cur is None or not m:
            continue
        rtype, rest = result_type(m.group(2))
        op, _, args = rest.partition("(")
        depth, end = 1, len(args)
        for i, ch in enumerate(args):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                end = i
                break
        operands = re.findall(r"%([\w.\-]+)", args[:end])
        index = int(args[:end]) if op.strip() == "parameter" else -1
        attrs = args[end + 1:]
        frame = re.search(r"stack_frame_id=(\d+)", attrs)
        op_name = re.search(r'op_name="((?:[^"\\]|\\.)*)"', attrs)  # may hold \" (tokamax's)
        cur.instrs.append(Instr(m.group(1), op.strip(), shapes_in(rtype), operands, attrs,
                                index, int(frame.group(1)) if frame else 0,
                                op_name.group(1) if op_name else ""))
    return comps


def attr(attrs: str, key: str) -> str | None:
    m = re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
    return m.group(1) if m else None


def callees(attrs: str) -> list[str]:
    names = re.findall(r"\b(?:to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)",
                       attrs)
    m = re.search(r"branch_computations=\{([^}]*)\}", attrs)
    return names + (re.findall(r"%?([\w.\-]+)", m.group(1)) if m else [])


def dims(attrs: str, key: str) -> list[int]:
    m = re.search(rf"{key}=\{{([0-9,]*)\}}", attrs)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def backend_config(attrs: str) -> dict:
    i = attrs.find("backend_config=")
    if i < 0 or attrs[i + 15: i + 16] != "{":
        return {}
    try:
        return json.JSONDecoder().raw_decode(attrs[i + 15:])[0]
    except ValueError:
        return {}


def trip_count(ins: Instr) -> int:
    n = backend_config(ins.attrs).get("known_trip_count", {}).get("n")
    return int(n) if n else 1


def target(ins: Instr) -> str:
    m = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
    return m.group(1) if m else ""


def stack_frames(hlo_text: str) -> dict[int, list[tuple[str, str]]]:
    """Stack frame id -> [(file, function), ...], innermost first, from the tables XLA prints
    before the computations. A frame prints its parent as (parent's id + 1); 1 means none."""
    sections: dict[str, list[str]] = {}
    cur = None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            cur = sections.setdefault(line, [])
        elif not line.strip() or line.startswith(("%", "ENTRY", "HloModule")):
            cur = None
        elif cur is not None:
            cur.append(line)

    def table(name):
        return {int(x.split(" ", 1)[0]): x.split(" ", 1)[1] for x in sections.get(name, [])}

    def field_of(text, key):
        return int(re.search(rf"\b{key}=(\d+)", text).group(1))

    files = {k: v.strip('"') for k, v in table("FileNames").items()}
    funcs = {k: v.strip('"') for k, v in table("FunctionNames").items()}
    locs = {k: (files.get(field_of(v, "file_name_id"), "?"),
                funcs.get(field_of(v, "function_name_id"), "?"))
            for k, v in table("FileLocations").items()}
    raw = {k: (field_of(v, "file_location_id"), field_of(v, "parent_frame_id") - 1)
           for k, v in table("StackFrames").items()}
    out = {}
    for fid in raw:
        chain, cur_id, seen = [], fid, set()
        while cur_id in raw and cur_id not in seen:
            seen.add(cur_id)
            chain.append(locs.get(raw[cur_id][0], ("?", "?")))
            cur_id = raw[cur_id][1]
        out[fid] = chain
    return out
