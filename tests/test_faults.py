"""Faults and abuse: every case ends in its exit code and one line, and leaves the paths around it as they were."""

from __future__ import annotations

import hashlib
import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.models import tiny_torrent
from tests.test_quantize_engine import tiny_hf


def tree(path: Path) -> dict[str, str]:
    """Every file under `path` with the sha256 of its bytes: what must not change."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def one_line_error(result, code: int, says: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert says in result.stderr and result.stderr.count("\n") == 1, result.stderr


# ---- an output may never equal, contain or lie inside an input (with --force it would delete it) ------------

@pytest.mark.parametrize("where, says", [(".", "the output contains the input"),
                                         ("src", "the output is the input"),
                                         ("src/out", "the output lies inside the input")])
def test_convert_never_replaces_its_source(cli, tmp_path, where, says):
    src = tiny_torrent(tmp_path / "src")
    before = tree(tmp_path)
    result = cli("convert", src, tmp_path / where, "--to", "hf", "--force")
    one_line_error(result, 1, says)
    assert tree(tmp_path) == before


def test_convert_through_a_symlink_to_the_source_is_refused(cli, tmp_path):
    src = tiny_torrent(tmp_path / "src")
    (tmp_path / "link").symlink_to(src)
    before = tree(tmp_path)
    one_line_error(cli("convert", src, tmp_path / "link", "--to", "hf", "--force"), 1, "the output is the input")
    assert tree(tmp_path) == before and (tmp_path / "link").is_symlink()


@pytest.mark.parametrize("where, says", [("m", "the output is the input"), (".", "the output contains the input")])
def test_quantize_never_replaces_its_model(cli, tmp_path, where, says):
    model = tiny_hf(tmp_path / "m")
    before = tree(tmp_path)
    one_line_error(cli("quantize", "rtn", model, tmp_path / where if where != "m" else model, "--force"), 1, says)
    assert tree(tmp_path) == before


# ---- numbers that make no sense are usage errors, before any work -------------------------------------------

@pytest.mark.parametrize("args", [["quantize", "gptq", "{m}", "{out}", "--samples", "0"],
                                  ["quantize", "gptq", "{m}", "{out}", "--samples", "-1"],
                                  ["quantize", "gptq", "{m}", "{out}", "--seqlen", "-1"],
                                  ["quantize", "gptq", "{m}", "{out}", "--damp", "-1"],
                                  ["quantize", "rtn", "{m}", "{out}", "--group-size", "0"],
                                  ["quantize", "rtn", "{m}", "{out}", "--batch", "0"],
                                  ["quantize", "awq", "{m}", "{out}", "--grid", "0"],
                                  ["check", "{m}", "--seqlen", "0"],
                                  ["check", "{m}", "--eval-batch", "0"],
                                  ["check", "{m}", "--max-new-tokens", "-1"]])
def test_nonsense_numbers_are_usage_errors(cli, tmp_path, args):
    model = tiny_hf(tmp_path / "m")
    before = tree(tmp_path)
    result = cli(*[a.format(m=model, out=tmp_path / "out") for a in args])
    assert result.exit_code == 2 and "Invalid value" in result.stderr, result.stderr
    assert tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# ---- malformed containers: refused in one line before any tensor is read or allocated ------------------------

def rewrite_safetensors(file: Path, edit) -> None:
    """Replace a safetensors file's header by edit(header) (a dict, or raw bytes), keeping its data."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + n]))
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _tensor(header, index=0):
    return [k for k in header if k != "__metadata__"][index]


def _same_offsets(h):  # the second norm claims the first norm's bytes
    norms = [k for k in h if k.endswith("norm.weight")]
    h[norms[1]]["data_offsets"] = h[norms[0]]["data_offsets"]
    return h


SAFETENSORS_CASES = {
    "header beyond the file": (lambda raw: struct.pack("<Q", len(raw)) + raw[8:], "truncated"),
    "header of 2^63 bytes": (lambda raw: struct.pack("<Q", 2**63) + raw[8:], "truncated"),
    "header over the limit": (lambda raw: struct.pack("<Q", 17 << 20) + b" " * (17 << 20), "over the"),
    "invalid JSON": (lambda h: b"{not json" + b" " * 8, "unreadable safetensors header"),
    "a list": (lambda h: list(h), "not an object"),
    "an entry that is a number": (lambda h: h | {_tensor(h): 5}, "must hold exactly dtype"),
    "unknown dtype": (lambda h: (h[_tensor(h)].update(dtype="F7"), h)[1], "unknown dtype 'F7'"),
    "negative offsets": (lambda h: (h[_tensor(h)].update(data_offsets=[-64, 0]), h)[1], "0 <= begin"),
    "string shape": (lambda h: (h[_tensor(h)].update(shape=["64"]), h)[1], "not a list of non-negative"),
    "overlapping offsets": (_same_offsets, "overlaps the tensor before it"),
    "offsets past the end": (lambda h: (h[_tensor(h, -1)].update(
        data_offsets=[h[_tensor(h, -1)]["data_offsets"][0] + 8, h[_tensor(h, -1)]["data_offsets"][1] + 8]), h)[1],
        "truncated"),
    "shape against bytes": (lambda h: (h[_tensor(h)].update(shape=h[_tensor(h)]["shape"] + [2]), h)[1],
                            "bytes but its shape"),
    "metadata not strings": (lambda h: h | {"__metadata__": {"format": 1}}, "__metadata__ must map"),
}


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
def test_malformed_safetensors_is_refused(cli, tmp_path, case):
    model = tiny_hf(tmp_path / "m")
    shard = sorted(model.glob("*.safetensors"))[0]
    edit, says = SAFETENSORS_CASES[case]
    if case.startswith("header"):
        shard.write_bytes(edit(shard.read_bytes()))
    else:
        rewrite_safetensors(shard, edit)
    before = tree(tmp_path)
    result = cli("convert", model, tmp_path / "out", "--to", "torrent")
    one_line_error(result, 1, says)
    assert str(shard) in result.stderr and tree(tmp_path) == before


def gguf_string(text: str | bytes, length: int | None = None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def gguf_bytes(kvs: list[bytes] = (), tensors: list[bytes] = (), n_kv: int | None = None,
               n_tensors: int | None = None, tail: bytes = b"\0" * 64) -> bytes:
    """A GGUF v3 file from its parts, written from the spec (not by gguf-py): the crafting tool for bombs."""
    return (b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                  len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors) + tail)


def gguf_kv(key: str, kind: int, payload: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", kind) + payload


def gguf_tensor(name: str, dims: list[int], type_id: int = 0, offset: int = 0, n_dims: int | None = None) -> bytes:
    return (gguf_string(name) + struct.pack("<I", len(dims) if n_dims is None else n_dims)
            + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", type_id, offset))


ARCH_KV = gguf_kv("general.architecture", 8, gguf_string("llama"))
GGUF_BOMBS = {
    "tensor count of 2^60": (gguf_bytes([ARCH_KV], n_tensors=2**60), "2^60"),
    "metadata count of 2^60": (gguf_bytes([ARCH_KV], n_kv=2**60), "2^60"),
    "key of 2^60 bytes": (gguf_bytes([gguf_string("k", 2**60)], n_kv=1), "claims"),
    "uint8 array of 2^60": (gguf_bytes([gguf_kv("x", 9, struct.pack("<IQ", 0, 2**60))]), "elements of x"),
    "string array of 2^40": (gguf_bytes([gguf_kv("x", 9, struct.pack("<IQ", 8, 2**40))]), "claims"),
    "string array over the limit": (gguf_bytes([gguf_kv("x", 9, struct.pack("<IQ", 8, 3_000_000)
                                                        + gguf_string("") * 3_000_000)]), "limit of"),
    "string value past the end": (gguf_bytes([gguf_kv("x", 8, gguf_string("abc", 10**6))]), "value of x"),
    "unknown value type": (gguf_bytes([gguf_kv("x", 99, b"\0" * 8)]), "unknown value type id 99"),
    "array of arrays": (gguf_bytes([gguf_kv("x", 9, struct.pack("<IQ", 9, 1))]), "unsupported type id 9"),
    "duplicated key": (gguf_bytes([ARCH_KV, ARCH_KV]), "appears twice"),
    "dimension count of 2^31": (gguf_bytes([ARCH_KV], [gguf_tensor("t", [4], n_dims=2**31)]), "dimensions"),
    "unknown tensor type": (gguf_bytes([ARCH_KV], [gguf_tensor("t", [4], type_id=99)]), "type id 99"),
    "tensor past the end": (gguf_bytes([ARCH_KV], [gguf_tensor("t", [2**40])]), "past the end"),
    "misaligned tensor": (gguf_bytes([ARCH_KV], [gguf_tensor("t", [4], offset=3)]), "misaligned"),
    "cut in the header": (gguf_bytes([ARCH_KV])[:50], "file ends"),
    "version 1": (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "version 1"),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
}


@pytest.mark.parametrize("case", GGUF_BOMBS)
def test_malformed_gguf_is_refused(cli, tmp_path, case):
    data, says = GGUF_BOMBS[case]
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    before = tree(tmp_path)
    result = cli("convert", path, tmp_path / "out", "--to", "hf")
    one_line_error(result, 1, says.replace("2^60", str(2**60)))
    assert str(path) in result.stderr and tree(tmp_path) == before


# ---- configurations that lie: refused before anything is sized from them -----------------------------------

CONFIG_LIES = {  # config.json of an HF model
    "a billion layers": ({"num_hidden_layers": 10**9}, "num_layers 1000000000 is over"),
    "layers as text": ({"num_hidden_layers": "2"}, "num_layers must be a positive integer, got '2'"),
    "no heads": ({"num_attention_heads": 0}, "num_heads must be a positive integer, got 0"),
    "eps as text": ({"rms_norm_eps": "nan"}, "rms_norm_eps must be a positive finite number"),
    "negative theta": ({"rope_theta": -1}, "rope_theta must be a positive finite number"),
    "no context": ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer"),
    "rope scaling as text": ({"rope_scaling": "linear"}, "rope_scaling must be an object"),
    "quantization as text": ({"quantization_config": "awq"}, "quantization_config must be an object"),
    "a float layer count": ({"num_hidden_layers": 2.5}, "num_layers must be a positive integer, got 2.5"),
}


@pytest.mark.parametrize("case", CONFIG_LIES)
def test_config_that_lies_is_refused(cli, tmp_path, case):
    model = tiny_hf(tmp_path / "m")
    change, says = CONFIG_LIES[case]
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | change))
    before = tree(tmp_path)
    one_line_error(cli("convert", model, tmp_path / "out", "--to", "gguf"), 1, says)
    assert tree(tmp_path) == before


PARAMS_LIES = {  # params.json of a torrent
    "a billion layers": ({"n_layers": 10**9}, "num_layers 1000000000 is over"),
    "no heads": ({"n_heads": 0}, "num_heads must be a positive integer, got 0"),
    "eps as text": ({"norm_eps": "nan"}, "rms_norm_eps must be a positive finite number, got 'nan'"),
    "negative theta": ({"rope_theta": -1}, "rope_theta must be a positive finite number"),
    "experts as text": ({"moe": {"num_experts": "4", "num_experts_per_tok": 2}}, "num_experts must be"),
}


@pytest.mark.parametrize("case", PARAMS_LIES)
def test_params_that_lie_are_refused(cli, tmp_path, case):
    src = tiny_torrent(tmp_path / "src", layers=1)
    change, says = PARAMS_LIES[case]
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps(params | change))
    before = tree(tmp_path)
    one_line_error(cli("convert", src, tmp_path / "out", "--to", "hf"), 1, says)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("entry, says", [(7, "weight_map names 7"), ("../m/x.safetensors", "must be file names"),
                                         ("/etc/passwd", "must be file names")])
def test_weight_map_outside_the_folder_is_refused(cli, tmp_path, entry, says):
    model = tiny_hf(tmp_path / "m")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": entry}}))
    before = tree(tmp_path)
    one_line_error(cli("inspect", model), 1, says)
    assert tree(tmp_path) == before


def test_garbage_tokenizer_model_is_refused(cli, tmp_path):
    src = tiny_torrent(tmp_path / "src", layers=1)
    (src / "tokenizer.model").write_bytes(b"\x0a\xff\xff\xff\xff\x0fgarbage" * 50)
    before = tree(tmp_path)
    one_line_error(cli("convert", src, tmp_path / "out", "--to", "hf"), 1, str(src / "tokenizer.model"))
    assert tree(tmp_path) == before


class _Planted:
    """Unpickling this would create `marker`: the proof that a checkpoint ran code."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.mkdir, (self.marker,))


def test_pickled_code_in_a_pth_never_runs(cli, tmp_path):
    import torch
    src = tiny_torrent(tmp_path / "src", layers=1)
    state = torch.load(src / "consolidated.00.pth", weights_only=True)
    marker = tmp_path / "pwned"
    torch.save(state | {"evil": _Planted(str(marker))}, src / "consolidated.00.pth")
    before = tree(tmp_path)
    result = cli("convert", src, tmp_path / "out", "--to", "hf")
    assert result.exit_code == 1 and str(src / "consolidated.00.pth") in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not marker.exists() and tree(tmp_path) == before


GGUF_LIES = {  # metadata of a real tiny GGUF, rewritten with gguf-py's writer
    "block count as text": ("llama.block_count", "1", "num_layers must be a positive integer, got '1'"),
    "a billion blocks": ("llama.block_count", 10**9, "num_layers 1000000000 is over"),
    "no context": ("llama.context_length", 0, "max_position_embeddings must be a positive integer"),
    "no heads": ("llama.attention.head_count", 0, "num_heads must be a positive integer, got 0"),
    "unknown tokenizer": ("tokenizer.ggml.model", "bert", "unsupported GGUF tokenizer model 'bert'"),
}


@pytest.mark.parametrize("case", GGUF_LIES)
def test_gguf_metadata_that_lies_is_refused(cli, tmp_path, case):
    from gguf import GGUFValueType

    from mixq.convert import convert_checkpoint
    from tests.test_gguf import rewrite_gguf
    key, value, says = GGUF_LIES[case]
    tiny_torrent(tmp_path / "src", layers=1)
    convert_checkpoint(tmp_path / "src", tmp_path / "m.gguf", "gguf", outtype="f16")
    kind = GGUFValueType.STRING if isinstance(value, str) else GGUFValueType.UINT32
    rewrite_gguf(tmp_path / "m.gguf", tmp_path / "lie.gguf", replace={key: (value, kind)})
    (tmp_path / "m.gguf").unlink()
    before = tree(tmp_path)
    one_line_error(cli("convert", tmp_path / "lie.gguf", tmp_path / "out", "--to", "hf"), 1, says)
    assert str(tmp_path / "lie.gguf") in cli("inspect", tmp_path / "lie.gguf").stderr and tree(tmp_path) == before


# ---- the output path: never replaced without --force, nothing outside it ever touched -----------------------

def _out_is_a_file(out):
    out.write_text("mine")


def _out_is_a_full_folder(out):
    out.mkdir()
    (out / "keep.txt").write_text("mine")


def _out_links_elsewhere(out):
    (out.parent / "elsewhere").mkdir()
    (out.parent / "elsewhere" / "keep.txt").write_text("mine")
    out.symlink_to(out.parent / "elsewhere")


def _out_dangles(out):
    out.symlink_to(out.parent / "nowhere")


@pytest.mark.parametrize("make_out", [_out_is_a_file, _out_is_a_full_folder, _out_links_elsewhere, _out_dangles])
@pytest.mark.parametrize("to", ["hf", "gguf"])
def test_an_existing_output_is_replaced_only_with_force(cli, tmp_path, make_out, to):
    src = tiny_torrent(tmp_path / "src", layers=1)
    out = tmp_path / ("out.gguf" if to == "gguf" else "out")
    make_out(out)
    before = tree(tmp_path)
    one_line_error(cli("convert", src, out, "--to", to), 1, "already exists (use --force")
    assert tree(tmp_path) == before and out.is_symlink() | out.exists()
    elsewhere = tmp_path / "elsewhere"
    kept = tree(elsewhere) if elsewhere.exists() else None
    assert cli("convert", src, out, "--to", to, "--force").exit_code == 0
    assert not out.is_symlink() and (out / "config.json" if to == "hf" else out).is_file()
    if kept is not None:  # the folder the link pointed to is not the output: left as it was
        assert tree(elsewhere) == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", out.name] + ["elsewhere"] * (kept is not None))


def test_output_under_a_file_is_one_line(cli, tmp_path):
    src = tiny_torrent(tmp_path / "src", layers=1)
    (tmp_path / "file").write_text("mine")
    before = tree(tmp_path)
    one_line_error(cli("convert", src, tmp_path / "file" / "out", "--to", "hf"), 1, str(tmp_path / "file"))
    assert tree(tmp_path) == before


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs: a full disk, mounted for the test (needs root; skipped where it cannot mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)  # lazy: a failed test cannot leave it mounted


@pytest.mark.parametrize("to, extra", [("hf", []), ("torrent", []), ("gguf", []),
                                       ("gguf", ["--split-max-size", "1MB"])])
def test_a_full_disk_is_one_line_and_leaves_nothing(cli, tmp_path, small_disk, to, extra):
    src = tiny_torrent(tmp_path / "src", layers=2)  # 4 MB of bf16 embeddings alone: cannot fit in 2 MB
    (small_disk / "keep.txt").write_text("mine")
    before = tree(small_disk)
    out = small_disk / ("out.gguf" if to == "gguf" else "out")
    one_line_error(cli("convert", src, out, "--to", to, *extra), 1, "No space left on device")
    assert tree(small_disk) == before and sorted(p.name for p in small_disk.iterdir()) == ["keep.txt"]


def test_a_read_only_disk_is_one_line(cli, tmp_path, small_disk):
    src = tiny_torrent(tmp_path / "src", layers=1)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    one_line_error(cli("convert", src, small_disk / "out", "--to", "hf"), 1, "Read-only file system")
    assert list(small_disk.iterdir()) == []


# ---- signals and a second writer: staging removed, nothing mixed, --resume continues -----------------------

def mixq_process(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mixq", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"never saw {what}: {process.communicate()}")
        time.sleep(0.005)


def stop_then_signal(process: subprocess.Popen, signum: int) -> tuple[int, str]:
    """Freeze the process where it is, deliver `signum`, let it run its handler; returns (exit code, stderr)."""
    process.send_signal(signal.SIGSTOP)
    process.send_signal(signum)
    process.send_signal(signal.SIGCONT)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_a_signalled_conversion_leaves_nothing(tmp_path, signum, code):
    src = tiny_torrent(tmp_path / "src", layers=4, dim=256, hidden_dim=512)
    before = tree(tmp_path)
    process = mixq_process("convert", src, tmp_path / "out.gguf", "--to", "gguf", "--outtype", "q8_0")
    wait_for(lambda: any(p.name.endswith(".partial") for p in tmp_path.iterdir()), process, "the staging folder")
    rc, err = stop_then_signal(process, signum)
    assert rc == code and err.strip().splitlines()[-1].startswith("mixq: "), (rc, err)
    assert tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_terminated_quantization_resumes_to_the_same_bytes(tmp_path):
    model = tiny_hf(tmp_path / "m", layers=12)
    assert subprocess.run([sys.executable, "-m", "mixq", "quantize", "rtn", model, tmp_path / "whole", "-q"],
                          capture_output=True).returncode == 0
    process = mixq_process("quantize", "rtn", model, tmp_path / "out", "-q")
    work = tmp_path / ".out.mixq-partial"
    wait_for(lambda: (work / "layer-00001.safetensors").exists(), process, "the second layer")
    rc, err = stop_then_signal(process, signal.SIGTERM)
    assert rc == 143 and "terminated by SIGTERM" in err and not (tmp_path / "out").exists()
    resumed = subprocess.run([sys.executable, "-m", "mixq", "quantize", "rtn", model, tmp_path / "out", "--resume"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0 and "resuming at layer" in resumed.stderr, resumed.stderr
    whole, out = tree(tmp_path / "whole"), tree(tmp_path / "out")
    assert whole.pop("report.json") and out.pop("report.json") and whole == out
    assert not work.exists()


def test_two_writers_of_one_output_one_wins_whole(tmp_path):
    src = tiny_torrent(tmp_path / "src", layers=2)
    first = mixq_process("convert", src, tmp_path / "out", "--to", "hf")
    wait_for(lambda: (tmp_path / ".out.mixq-lock").exists(), first, "the first writer's lock")
    first.send_signal(signal.SIGSTOP)
    second = subprocess.run([sys.executable, "-m", "mixq", "convert", src, tmp_path / "out", "--to", "hf",
                             "--force"], capture_output=True, text=True)
    first.send_signal(signal.SIGCONT)
    first.communicate(timeout=120)
    assert second.returncode == 1 and "another mixq process is writing it" in second.stderr, second.stderr
    assert first.returncode == 0
    subprocess.run([sys.executable, "-m", "mixq", "convert", src, tmp_path / "alone", "--to", "hf"], check=True)
    assert tree(tmp_path / "out") == tree(tmp_path / "alone")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone", "out", "src"]


def test_a_damaged_work_folder_is_refused_on_resume(cli, tmp_path):
    model = tiny_hf(tmp_path / "m")
    work = tmp_path / ".out.mixq-partial"
    work.mkdir()
    (work / "state.json").write_text('{"next_layer": "two"}')
    one_line_error(cli("quantize", "rtn", model, tmp_path / "out", "--resume"), 1, "work folder of an interrupted")
    assert not (tmp_path / "out").exists()


# ---- calibration and evaluation text that cannot be read as text ------------------------------------------

def _zero_txt(path):
    path.with_suffix(".txt").symlink_to("/dev/zero")
    return path.with_suffix(".txt")


TEXT_CASES = {
    "empty": (lambda p: (p.with_suffix(".txt").write_text("\n \n"), p.with_suffix(".txt"))[1], "empty text file"),
    "binary": (lambda p: (p.with_suffix(".txt").write_bytes(b"ab\0cd" * 20), p.with_suffix(".txt"))[1],
               "binary data"),
    "invalid UTF-8": (lambda p: (p.with_suffix(".txt").write_bytes(b"caf\xe9 au lait"), p.with_suffix(".txt"))[1],
                      "not UTF-8 text (byte 3)"),
    "0-byte parquet": (lambda p: (p.with_suffix(".parquet").write_bytes(b""), p.with_suffix(".parquet"))[1],
                       "unreadable parquet"),
    "jsonl without its field": (lambda p: (p.with_suffix(".jsonl").write_text('{"body": "x"}\n'),
                                           p.with_suffix(".jsonl"))[1], "no 'text' or 'messages' field"),
    "an endless device": (_zero_txt, "not a regular file"),
    "a conversation the template rejects": (lambda p: (p.with_suffix(".jsonl").write_text(json.dumps(
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}) + "\n"),
        p.with_suffix(".jsonl"))[1], "rejects a conversation"),
}


@pytest.mark.parametrize("case", TEXT_CASES)
def test_calibration_text_that_is_not_text(cli, tmp_path, case):
    model = tiny_hf(tmp_path / "m")
    make, says = TEXT_CASES[case]
    source = make(tmp_path / "calib")
    before = tree(tmp_path)
    one_line_error(cli("quantize", "gptq", model, tmp_path / "out", "--calib", source, "--samples", 1,
                       "--seqlen", 8), 1, says)
    assert tree(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["empty", "binary", "invalid UTF-8", "an endless device"])
def test_evaluation_text_that_is_not_text(cli, tmp_path, case):
    model = tiny_hf(tmp_path / "m")
    make, says = TEXT_CASES[case]
    source = make(tmp_path / "eval")
    before = tree(tmp_path)
    one_line_error(cli("check", model, "--eval", source, "--max-new-tokens", 0), 1, says)
    one_line_error(cli("quantize", "rtn", model, tmp_path / "out", "--check", "--eval", source), 1, says)
    assert tree(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, bits", [("gptq", 3), ("awq", 8), ("rtn", 5)])
def test_bits_a_format_cannot_hold_are_usage_errors(cli, tmp_path, method, bits):
    model = tiny_hf(tmp_path / "m")
    before = tree(tmp_path)
    result = cli("quantize", method, model, tmp_path / "out", "--bits", bits, *(["--calib", "kjv"] * (method != "rtn")))
    assert result.exit_code == 2 and "Invalid value for '--bits'" in result.stderr, result.stderr
    assert tree(tmp_path) == before


def test_a_prepared_file_sliced_by_samples_says_so(cli, tmp_path):
    from mixq.calibration import Blocks
    model = tiny_hf(tmp_path / "m")
    prepared = tmp_path / "calib.safetensors"
    assert cli("calibration", "prepare", model, "--calib", "kjv", "--samples", 6, "--seqlen", 16,
               "-o", prepared).exit_code == 0
    report = json.loads(cli("quantize", "gptq", model, tmp_path / "out", "--calib", prepared, "--samples", 2,
                            "--json").stdout)
    assert report["calibration"]["samples"] == 2 and report["calibration"]["tokens"] == 2 * 16
    assert report["calibration"]["requested_samples"] == 2 and report["calibration"]["prepared_file"] == str(prepared)
    blocks = Blocks.load(prepared)
    blocks.tokens[0, 3] = -1  # would wrap to the last embedding row
    blocks.save(tmp_path / "bad.safetensors")
    one_line_error(cli("quantize", "gptq", model, tmp_path / "out2", "--calib", tmp_path / "bad.safetensors",
                       "--samples", 2), 1, "token ids -1..")
    assert not (tmp_path / "out2").exists()


def test_a_check_report_of_the_wrong_shape_is_one_line(cli, tmp_path):
    (tmp_path / "rel" / "awq").mkdir(parents=True)
    (tmp_path / "rel" / "awq" / "check.json").write_text(json.dumps({"perplexity": "low", "tokens": 10}))
    one_line_error(cli("report", tmp_path / "rel"), 1, "perplexity must be a number, got 'low'")


MEASURE = """
import resource, sys
from click.testing import CliRunner
from mixq.cli import main
runner, paths = CliRunner(), sys.argv[1:]
runner.invoke(main, ["inspect", paths[0]])  # imports and first allocations, before the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
codes = [runner.invoke(main, ["inspect", p]).exit_code for p in paths]
print(codes, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""


def test_malformed_containers_allocate_no_more_than_their_size(tmp_path):
    """One process reads every crafted file: its peak memory may not grow by more than the largest file
    (a mapped file's pages count) and a small allowance; a reader that loops or allocates without bound fails."""
    paths = []
    for i, (data, _) in enumerate(GGUF_BOMBS.values()):
        paths.append(tmp_path / f"{i}.gguf")
        paths[-1].write_bytes(data)
    config = (tiny_hf(tmp_path / "m") / "config.json").read_text()
    entries = b",".join(b'"e%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i for i in range(200_000))
    for i, text in enumerate([b"{" + entries + b"}", b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                              b'"b":{"dtype":"F32","shape":[1],"data_offsets":[-8,-4]}}']):
        folder = tmp_path / f"st{i}"  # 10 MB of empty tensors; offsets into the header
        folder.mkdir()
        (folder / "config.json").write_text(config)
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 4)
        paths.append(folder)
    largest = max(p.stat().st_size if p.is_file() else (p / "model.safetensors").stat().st_size for p in paths)
    result = subprocess.run([sys.executable, "-c", MEASURE, *map(str, paths)], capture_output=True, text=True,
                            timeout=120)
    codes, grown_kb = result.stdout.split("] ")
    assert set(json.loads(codes + "]")) == {1}, result.stdout
    assert int(grown_kb) * 1024 < 2 * largest + (64 << 20), (int(grown_kb) >> 10, largest >> 20)


# ---- preflight: what a pipeline will need, refused before its first step ----------------------------------

def test_preflight_refuses_what_the_pipeline_would_fail_on(cli, tmp_path, small_disk, monkeypatch):
    import builtins

    from mixq.convert.ggufio import GGUF_PY_TYPES, LLAMA_CPP_TYPES
    from mixq.quantize.preflight import GGUF_BITS
    assert set(GGUF_BITS) == set(GGUF_PY_TYPES) | set(LLAMA_CPP_TYPES)  # every type the converter writes
    model = tiny_hf(tmp_path / "m")
    ok = json.loads(cli("preflight", model, tmp_path / "rel", "--method", "awq", "--outtype", "q8_0",
                        "--calib", "kjv", "--eval", "shakespeare", "--json").stdout)
    assert 0 < ok["bytes_needed"] < ok["bytes_free"]
    one_line_error(cli("preflight", model, tmp_path / "rel", "--eval", tmp_path / "none.txt"), 1, "none.txt: no such")
    one_line_error(cli("preflight", model, small_disk / "rel", "--method", "gptq", "--outtype", "f16"), 1,
                   "the outputs still to make need about")
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "llama_cpp" else real_import(name, *a, **k))
    one_line_error(cli("preflight", model, tmp_path / "rel", "--outtype", "q4_k_m"), 1, "need llama.cpp's quantizer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "m"]


def test_check_output_is_refused_before_the_evaluation(cli, tmp_path):
    model = tiny_hf(tmp_path / "m")
    (tmp_path / "report.json").write_text("mine")
    before = tree(tmp_path)
    one_line_error(cli("check", model, "-o", tmp_path / "report.json"), 1, "already exists (use --force")
    one_line_error(cli("check", model, "-o", tmp_path / "no" / "r.json"), 1, f"no folder {tmp_path / 'no'}")
    assert tree(tmp_path) == before and not (tmp_path / "no").exists()


@pytest.mark.parametrize("layout, says", [("torrent", "params.json"), ("gguf", "Is a directory"),
                                          ("hf", "config.json")])
def test_a_wrong_from_is_one_line(cli, tmp_path, layout, says):
    src = tiny_torrent(tmp_path / "src", layers=1) if layout != "torrent" else tiny_hf(tmp_path / "m")
    before = tree(tmp_path)
    one_line_error(cli("convert", src, tmp_path / "out", "--to", "hf" if layout != "hf" else "torrent",
                       "--from", layout), 1, says)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("args", [["convert", "{m}", "{out}", "--to", "hf", "--shard-size", "lots"],
                                  ["convert", "{m}", "{out}.gguf", "--to", "gguf", "--split-max-size", "0"],
                                  ["quantize", "rtn", "{m}", "{out}", "--shard-size", "-5GB"]])
def test_bad_sizes_are_usage_errors(cli, tmp_path, args):
    model = tiny_hf(tmp_path / "m")
    before = tree(tmp_path)
    result = cli(*[a.format(m=model, out=tmp_path / "out") for a in args])
    assert result.exit_code == 2 and "Invalid value for '--" in result.stderr, result.stderr
    assert tree(tmp_path) == before


@pytest.mark.parametrize("name, content, says", [
    ("tokenizer_config.json", "[1, 2]", "expected a JSON object, found list"),
    ("tokenizer.json", '{"model": {"type": "BPE", "vocab": 5}}', "malformed tokenizer files"),
    ("tokenizer_config.json", '{"chat_template": [{"name": "default", "template": 1}]}',
     "chat_template must be text, got 1")])
def test_tokenizer_files_of_the_wrong_shape(cli, tmp_path, name, content, says):
    model = tiny_hf(tmp_path / "m")
    (model / "tokenizer.model").unlink(missing_ok=True) if name == "tokenizer.json" else None
    (model / name).write_text(content)
    before = tree(tmp_path)
    one_line_error(cli("convert", model, tmp_path / "out", "--to", "torrent"), 1, says)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("change, says", [({"bits": 8}, "contradicts config.json (8-bit, group 128)"),
                                          ({"group_size": 64}, "contradicts config.json (4-bit, group 64)"),
                                          ({"bits": 3}, "bits 3: the GPTQ format holds"),
                                          ({"group_size": "128"}, "group_size '128' is not")])
def test_a_quantized_repository_whose_config_contradicts_its_tensors(cli, tmp_path, change, says):
    model = tiny_hf(tmp_path / "m")
    assert cli("quantize", "rtn", model, tmp_path / "q", "-q").exit_code == 0
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"].update(change)
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    one_line_error(cli("check", tmp_path / "q", "--max-new-tokens", 0, "--max-tokens", 64), 1, says)


def test_staging_left_by_a_killed_writer_is_swept(cli, tmp_path):
    """SIGKILL cannot be handled: the next writer of the same output removes what the killed one left."""
    src = tiny_torrent(tmp_path / "src", layers=1)
    (tmp_path / ".out.k1ll3d.partial").mkdir()
    (tmp_path / ".out.k1ll3d.partial" / "model.safetensors").write_bytes(b"\0" * 4096)
    (tmp_path / ".other.k1ll3d.partial").mkdir()  # another output's: not this writer's to remove
    assert cli("convert", src, tmp_path / "out", "--to", "hf").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.k1ll3d.partial", "out", "src"]
