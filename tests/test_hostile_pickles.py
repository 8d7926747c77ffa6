"""No file can make a command run code: hostile pickles, in torch's zip format, its legacy
format and as a raw pickle, against every loader. Each payload writes a marker file if it runs."""

import builtins
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch

import conversion
from conversion.init_from import init_arrays
from nanomoe.pt_files import load_checkpoint_file
from nanomoe.errors import NanoMoeError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ("zip", "legacy", "raw")
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's legacy files open with this pickled number


class _Reduce:
    """Pickles as ``func(*args)``: what a hostile ``__reduce__`` makes a loader call."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _touch_code(marker):
    return f"open({str(marker)!r}, 'w').close()"


def _stack_global_bytes(marker) -> bytes:
    """Protocol 4, written opcode by opcode: STACK_GLOBAL of module ``torch``, name
    ``os.system`` (a dotted name that reaches ``os.system`` through ``torch.os``)."""
    def text(s):
        data = s.encode()
        return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE
    return (b"\x80\x04" + text("torch") + text("os.system") + b"\x93"  # STACK_GLOBAL
            + text(f"touch {marker}") + b"\x85" + b"R" + b".")  # TUPLE1 REDUCE STOP


@pytest.fixture(scope="module")
def evil_module(tmp_path_factory):
    """An importable module with a class named like the original's config whose reduce calls
    the module's own function: an unrestricted unpickler would import it and run it."""
    folder = tmp_path_factory.mktemp("evil")
    (folder / "evil_cfg_mod.py").write_text(textwrap.dedent("""
        def run(path):
            open(path, "w").close()
        class GPTConfig:
            def __init__(self, path):
                self.path = path
            def __reduce__(self):
                return run, (self.path,)
    """))
    sys.path.insert(0, str(folder))
    import evil_cfg_mod
    yield evil_cfg_mod
    sys.path.remove(str(folder))
    sys.modules.pop("evil_cfg_mod", None)


def payloads(marker, evil):
    import subprocess as sp
    return {
        "os_system": _Reduce(os.system, f"touch {marker}"),
        "subprocess": _Reduce(sp.call, ["touch", str(marker)]),
        "exec": _Reduce(builtins.exec, _touch_code(marker)),
        "eval": _Reduce(builtins.eval, f"__import__('os').system('touch {marker}')"),
        "stack_global": _stack_global_bytes(marker),
        "nested": {"model": {"wte.weight": torch.zeros(4, 2)},
                   "config": _Reduce(os.system, f"touch {marker}"), "step": 1},
        "evil_config": {"model": {}, "config": evil.GPTConfig(str(marker)), "step": 1},
    }


def write(path, payload, fmt) -> str:
    """``payload`` (an object, or a pickle's bytes) as a file of format ``fmt``."""
    if isinstance(payload, bytes):
        data = payload
        if fmt == "zip":
            with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
                z.writestr("archive/data.pkl", data)
                z.writestr("archive/byteorder", "little")
                z.writestr("archive/version", "3\n")
            return str(path)
        if fmt == "legacy":
            head = [LEGACY_MAGIC, 1001, dict(protocol_version=1001, little_endian=True,
                                             type_sizes=dict(short=2, int=4, long=4))]
            data = b"".join(pickle.dumps(x, protocol=2) for x in head) + data
        with open(path, "wb") as f:
            f.write(data)
    elif fmt == "raw":
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=fmt == "zip")
    return str(path)


NAMES = ("os_system", "subprocess", "exec", "eval", "stack_global", "nested", "evil_config")


def _hostile(tmp_path, evil, name, fmt):
    marker = tmp_path / "ran"
    return write(tmp_path / f"{name}.pt", payloads(marker, evil)[name], fmt), marker


LOADERS = {
    "load_checkpoint_file": load_checkpoint_file,
    "load_source": lambda p: conversion.load_source(p, log=lambda *_: None),
    "init_arrays": init_arrays,
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("loader", LOADERS)
def test_no_loader_runs_a_hostile_pickle(tmp_path, evil_module, name, fmt, loader):
    path, marker = _hostile(tmp_path, evil_module, name, fmt)
    with pytest.raises(NanoMoeError) as e:
        LOADERS[loader](path)
    assert not marker.exists(), "code from the file ran"
    msg = str(e.value)
    assert msg.startswith(path) and "nothing from it was run" in msg and "refers to" in msg
    assert "\n" not in msg


def test_message_names_the_global(tmp_path, evil_module):
    path, _ = _hostile(tmp_path, evil_module, "os_system", "legacy")
    with pytest.raises(NanoMoeError, match=r"refers to (posix|os)\.system, which a checkpoint"):
        load_checkpoint_file(path)
    path, _ = _hostile(tmp_path, evil_module, "stack_global", "raw")
    with pytest.raises(NanoMoeError, match=r"refers to torch\.os\.system"):
        load_checkpoint_file(path)
    path, _ = _hostile(tmp_path, evil_module, "evil_config", "zip")
    with pytest.raises(NanoMoeError, match=r"refers to evil_cfg_mod\.run"):
        load_checkpoint_file(path)


@pytest.mark.parametrize("fmt", ("zip", "legacy"))
def test_original_config_from_a_missing_module_is_read_as_data(tmp_path, fmt):
    folder = tmp_path / "mod"
    folder.mkdir()
    (folder / "gone_model.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        @dataclass
        class MoeGPTConfig:
            n_layer: int = 3
            n_embd: int = 64
    """))
    sys.path.insert(0, str(folder))
    try:
        import gone_model
        obj = {"model": {"w": torch.ones(2)}, "config": gone_model.MoeGPTConfig(), "step": 7}
        path = str(tmp_path / "orig.pt")
        torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("gone_model", None)
    ckpt = load_checkpoint_file(path)
    config = ckpt["config"]
    assert type(config).__name__ == "MoeGPTConfig" and vars(config) == dict(n_layer=3, n_embd=64)
    assert ckpt["step"] == 7 and torch.equal(ckpt["model"]["w"], torch.ones(2))


def _tiny_run_args(data, log_dir, steps):
    return ["--framework", "torch", "--model", "moegpt", "--n_layer", "1", "--n_embd", "32",
            "--n_head", "2", "--block_size", "32", "--data", str(data), "--log_dir",
            str(log_dir), "--B", "2", "--T", "16", "--total_batch_size", "64", "--max_steps",
            str(steps), "--warmup_steps", "1", "--dtype", "float32", "--eval_interval", "3",
            "--eval_steps", "1", "--ckpt_interval", "3", "--sample_tokens", "2"]


def assert_refused(cmd, marker, *, cwd=ROOT):
    r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=cwd,
                       timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(errors) == 1 and "nothing from it was run" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout
    assert not marker.exists(), "code from the file ran"


# each command gets another payload and format: all of them are covered in-process above
CLI_CASES = {
    "from-torch": ("os_system", "legacy",
                   lambda p, t: ["-m", "conversion", "from-torch", p, "--out", str(t / "o")]),
    "compare": ("stack_global", "zip", lambda p, t: ["-m", "conversion", "compare", p, p]),
    "torch-sample": ("exec", "raw",
                     lambda p, t: ["-m", "nanomoe_torch.sample", "--checkpoint", p]),
    "jax-sample": ("evil_config", "legacy",
                   lambda p, t: ["-m", "nanomoe_jax.sample", "--checkpoint", p]),
    "init-from": ("subprocess", "zip", lambda p, t: [
        "train.py", *_tiny_run_args(t / "c.txt", t / "run", 2), "--init_from", p]),
}


@pytest.mark.parametrize("cli", CLI_CASES)
def test_commands_refuse_a_hostile_pickle(tmp_path, evil_module, cli):
    name, fmt, argv = CLI_CASES[cli]
    (tmp_path / "c.txt").write_text("The quick brown fox jumps over the lazy dog. " * 100)
    path, marker = _hostile(tmp_path, evil_module, name, fmt)
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([evil_module.__file__.rsplit(os.sep, 1)[0],
                                                env_path])  # the evil module is importable
    try:
        assert_refused(argv(path, tmp_path), marker)
    finally:
        os.environ["PYTHONPATH"] = env_path
    assert not (tmp_path / "o").exists()


def test_torch_resume_refuses_a_hostile_newest_checkpoint(tmp_path, evil_module):
    from nanomoe.train_loop import main
    from nanomoe_train.torch_backend import TorchBackend

    data = tmp_path / "c.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 100)
    log = tmp_path / "run"
    assert main(_tiny_run_args(data, log, 3), TorchBackend) == 0
    newest = sorted(p for p in os.listdir(log) if p.startswith("model_0"))[-1]
    marker = tmp_path / "ran"
    write(log / newest, payloads(marker, evil_module)["nested"], "legacy")
    assert_refused(["train.py", *_tiny_run_args(data, log, 3), "--resume"], marker)


def test_numpy_shards_are_read_without_pickle(tmp_path):
    from nanomoe.data import DataError, read_npy

    path = tmp_path / "train_000.npy"
    np.save(path, np.array([_Reduce(os.system, "true")], dtype=object), allow_pickle=True)
    with pytest.raises(DataError):  # np.load with allow_pickle=False
        read_npy(path)
