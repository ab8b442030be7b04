"""GGUF as llama.cpp reads it: read (any type gguf-py dequantizes, split files, legacy per-expert tensors) and
write (tensor names, dtype policy and metadata as llama.cpp's converter writes them, one layer's experts at a
time)."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import gguf_stream
from .checkpoint import Checkpoint, TensorRef, checked_tensors
from .errors import MixqError
from .gguf_header import check_header
from .hf import parse_size
from .imatrix import Imatrix
from .llama_quantize import LLAMA_CPP_TYPES, Quantizer, refuse_without_imatrix
from .names import (
    DENSE_MLP_TENSORS,
    EXPERT_TENSORS,
    GLOBAL_TENSORS,
    LAYER_TENSORS,
    ROUTER_TENSORS,
    expected_shapes,
    rotary_heads,
)
from .output import claim, publish, refuse_existing, scratch_beside
from .pages import drop_file_pages
from .progress import bar, note
from .provenance import source_card
from .rope import half_to_interleaved, interleaved_to_half
from .spec import ModelSpec, integer, number, per_head
from .tokenizer import NORMAL, UNUSED, Vocab

ARCH = "llama"  # Mixtral, Mistral and Llama GGUFs all say general.architecture = llama
SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# The output types by the names of gguf's enums, which hold their numbers (gguf is imported only to read or write a
# GGUF: the CLI takes its --outtype choices from these tables at start-up).
# --outtype -> (GGMLQuantizationType of the matrices, LlamaFileType of the file) for what gguf-py writes itself
GGUF_PY_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
                 "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
                 "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1")}
# the K-quants and i-quants, made by llama.cpp's own quantizer: llama_quantize.LLAMA_CPP_TYPES


def _gguf():
    import gguf
    return gguf


def _file_type(name: str) -> int:
    """llama.cpp's file type id of a LlamaFileType name in the tables above."""
    return int(_gguf().LlamaFileType[name])


# ---- names --------------------------------------------------------------------------------------------------

def _gguf_names(spec: ModelSpec) -> dict[str, str]:
    """Canonical name -> GGUF name, for all tensors but the experts."""
    table = {c: g for c, _, g in GLOBAL_TENSORS}
    if spec.tie_word_embeddings:
        del table["lm_head.weight"]
    rows = list(LAYER_TENSORS) + list(ROUTER_TENSORS if spec.is_moe else DENSE_MLP_TENSORS)
    for layer in range(spec.num_layers):
        for c, _, g in rows:
            table[f"model.layers.{layer}.{c}"] = f"blk.{layer}.{g}"
    return table


# ---- reading ------------------------------------------------------------------------------------------------

def split_paths(path: Path) -> list[Path]:
    m = SPLIT.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    paths = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    for p in paths:
        if not p.is_file():
            raise MixqError(f"{p}: missing part {p.name} of a {count}-part split GGUF")
    return paths


class _File:
    """One GGUF file through gguf-py's reader, with clear errors for bad input."""

    def __init__(self, path: Path):
        gguf = _gguf()
        self.path = path
        check_header(path)
        try:  # the header was walked above; what gguf-py still refuses is refused in one line too
            self.reader = gguf.GGUFReader(path, mode="c")
        except (ValueError, IndexError, OverflowError, KeyError) as exc:
            raise MixqError(f"{path}: unreadable GGUF ({exc})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.base = self.reader.data.ctypes.data

    def fields(self) -> dict:
        out = {}
        for name, field in self.reader.fields.items():
            if name.startswith("GGUF."):
                continue
            out[name] = field.contents()
        return out

    def raw(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return t.data

    def release(self, name: str) -> None:
        t = self.tensors[name]
        drop_file_pages(self.base + t.data_offset, t.n_bytes)


def _to_torch(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Tensor bytes of one GGUF tensor (or an expert slice of it) -> a torch tensor of `shape`."""
    if type_name in ("F32", "F16"):
        return torch.from_numpy(data).reshape(shape)
    if type_name == "BF16":
        return torch.from_numpy(data).view(torch.bfloat16).reshape(shape)
    gguf = _gguf()
    try:
        values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name])
    except NotImplementedError:
        raise MixqError(f"tensor type {type_name} cannot be dequantized by gguf-py") from None
    return torch.from_numpy(values).reshape(shape)


def _required(kv: dict, key: str, where: Path):
    if key not in kv:
        raise MixqError(f"{where}: missing metadata key {key}")
    return kv[key]


def spec_from_metadata(kv: dict, tensor_names: set[str], where: Path) -> ModelSpec:
    keys = _gguf().Keys
    llm, attn, rope, tok = keys.LLM, keys.Attention, keys.Rope, keys.Tokenizer
    arch = kv.get(keys.General.ARCHITECTURE)
    if arch != ARCH:
        raise MixqError(f"{where}: unsupported GGUF architecture {arch!r} (Mixtral, Mistral and Llama GGUFs "
                        f"are 'llama')")
    k = lambda key: key.format(arch=ARCH)  # noqa: E731
    try:
        hidden = integer(_required(kv, k(llm.EMBEDDING_LENGTH), where))
        heads = integer(_required(kv, k(attn.HEAD_COUNT), where))
        experts = integer(kv.get(k(llm.EXPERT_COUNT), 0) or 0)
        name = str(kv.get(keys.General.NAME, "")) + " " + str(kv.get(keys.General.BASENAME, ""))
        vocab = kv.get(k(llm.VOCAB_SIZE)) or len(kv.get(tok.LIST) or []) or 0
        spec = ModelSpec(
            arch="mixtral" if experts else ("mistral" if "mistral" in name.lower() else "llama"),
            hidden_size=hidden, num_layers=integer(_required(kv, k(llm.BLOCK_COUNT), where)), num_heads=heads,
            num_kv_heads=integer(kv.get(k(attn.HEAD_COUNT_KV), heads)),
            head_dim=integer(kv.get(k(attn.KEY_LENGTH)) or kv.get(k(rope.DIMENSION_COUNT)) or per_head(hidden, heads)),
            intermediate_size=integer(_required(kv, k(llm.FEED_FORWARD_LENGTH), where)), vocab_size=integer(vocab),
            rms_norm_eps=number(_required(kv, k(attn.LAYERNORM_RMS_EPS), where)),
            rope_theta=number(kv.get(k(rope.FREQ_BASE), 10000.0)),
            max_position_embeddings=integer(_required(kv, k(llm.CONTEXT_LENGTH), where)),
            num_experts=experts, experts_per_tok=integer(kv.get(k(llm.EXPERT_USED_COUNT), 0) or 0),
            tie_word_embeddings="output.weight" not in tensor_names,
            bos_token_id=kv.get(tok.BOS_ID), eos_token_id=kv.get(tok.EOS_ID))
    except (TypeError, ZeroDivisionError) as exc:
        raise MixqError(f"{where}: bad metadata value ({exc})") from None
    if spec.vocab_size == 0:
        raise MixqError(f"{where}: missing metadata key {k(llm.VOCAB_SIZE)} (and no {tok.LIST})")
    return spec.validate(str(where))


def vocab_from_metadata(kv: dict, where: Path) -> Vocab | None:
    tok = _gguf().Keys.Tokenizer
    model = kv.get(tok.MODEL)
    tokens = kv.get(tok.LIST)
    if not model or not tokens:
        return None
    if model not in ("llama", "gpt2"):
        raise MixqError(f"{where}: unsupported GGUF tokenizer model {model!r} (llama or gpt2)")
    n = len(tokens)
    scores = kv.get(tok.SCORES) or [0.0] * n
    types = kv.get(tok.TOKEN_TYPE) or [NORMAL] * n
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens) \
            or not isinstance(scores, list) or not isinstance(types, list) or not len(scores) == len(types) == n \
            or not all(isinstance(x, (int, float)) for x in scores + types):
        raise MixqError(f"{where}: {tok.LIST}, scores and token_type must be arrays of {n} tokens, "
                        f"numbers and type ids")
    return Vocab(model=model, tokens=list(tokens), scores=[float(s) for s in scores], types=[int(t) for t in types],
                 merges=list(kv.get(tok.MERGES) or []), bos_id=kv.get(tok.BOS_ID), eos_id=kv.get(tok.EOS_ID),
                 unk_id=kv.get(tok.UNK_ID), pad_id=kv.get(tok.PAD_ID),
                 add_bos=bool(kv.get(tok.ADD_BOS, model == "llama")), add_eos=bool(kv.get(tok.ADD_EOS, False)),
                 add_space_prefix=bool(kv.get(tok.ADD_PREFIX, model == "llama")),
                 pre=kv.get(tok.PRE), chat_template=kv.get(tok.CHAT_TEMPLATE))


def _model_dtype(types: list[str]) -> torch.dtype:
    """What `--dtype auto` gives: the float type of most matrices, else f16 (the precision of block scales)."""
    floats = [t for t in types if t in FLOAT_TYPES]
    return FLOAT_TYPES[max(set(floats), key=floats.count)] if floats else torch.float16


def read_gguf(path: Path) -> Checkpoint:
    files = [_File(p) for p in split_paths(path)]
    kv = files[0].fields()
    located = {name: f for f in files for name in f.tensors}
    spec = spec_from_metadata(kv, set(located), path)
    to_gguf = _gguf_names(spec)
    matrices = [located[n].tensors[n].tensor_type.name for n in located
                if len(located[n].tensors[n].shape) >= 2 and "ffn_gate_inp" not in n]
    dtype = _model_dtype(matrices)
    found: dict[str, TensorRef] = {}
    for canonical, gguf_name in to_gguf.items():
        if gguf_name in located:
            found[canonical] = _ref(located[gguf_name], gguf_name, None, spec, canonical, dtype)
    if spec.is_moe:
        found.update(_expert_refs(spec, located, dtype))
    known = set(to_gguf.values()) | {n for n in located if re.match(r"blk\.\d+\.ffn_(gate|up|down|gate_up)"
                                                                         r"(_exps|\.\d+)\.weight$", n)}
    for name in located:
        if name not in known and name not in ("rope_freqs.weight",):
            raise MixqError(f"{located[name].path}: {name}: unexpected tensor for a {spec.arch} model "
                            f"with {spec.num_layers} layers")
    return Checkpoint(layout="gguf", path=path, spec=spec, tensors=checked_tensors(spec, found, path),
                      vocab=vocab_from_metadata(kv, path), source_config={k: v for k, v in kv.items()},
                      files=[f.path for f in files])


def _ref(file: _File, name: str, expert: int | None, spec: ModelSpec, canonical: str, dtype: torch.dtype,
         rows: slice | None = None) -> TensorRef:
    t = file.tensors[name]
    type_name = t.tensor_type.name
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if expert is not None:
        shape = shape[1:]
    if rows is not None:
        shape = (rows.stop - rows.start,) + shape[1:]
    heads = rotary_heads(spec, canonical)

    def load() -> torch.Tensor:
        data = file.raw(name)
        if expert is not None:
            data = data[expert]
        if rows is not None:
            data = data[rows]
        tensor = _to_torch(data, type_name, shape)
        return interleaved_to_half(tensor, heads) if heads else tensor

    nbytes = t.n_bytes // (spec.num_experts if expert is not None else 1)
    suffix = f"[{expert}]" if expert is not None else ""
    return TensorRef(shape=shape, dtype=dtype, stored=type_name, source=f"{file.path}: {name}{suffix}", load=load,
                     release=lambda: file.release(name), nbytes=nbytes)


def _expert_refs(spec: ModelSpec, located: dict[str, _File], dtype: torch.dtype) -> dict[str, TensorRef]:
    """Per-expert canonical tensors from the 3-D *_exps tensors, the fused gate_up, or legacy per-expert ones."""
    refs = {}
    ff = spec.intermediate_size
    for layer in range(spec.num_layers):
        fused = f"blk.{layer}.ffn_gate_up_exps.weight"
        for canonical_t, _, stacked, legacy in EXPERT_TENSORS:
            for e in range(spec.num_experts):
                canonical = f"model.layers.{layer}." + canonical_t.format(E=e)
                stacked_name, legacy_name = f"blk.{layer}.{stacked}", f"blk.{layer}.{legacy.format(E=e)}"
                if stacked_name in located:
                    refs[canonical] = _ref(located[stacked_name], stacked_name, e, spec, canonical, dtype)
                elif legacy_name in located:
                    refs[canonical] = _ref(located[legacy_name], legacy_name, None, spec, canonical, dtype)
                elif fused in located and stacked != "ffn_down_exps.weight":
                    rows = slice(0, ff) if stacked == "ffn_gate_exps.weight" else slice(ff, 2 * ff)
                    refs[canonical] = _ref(located[fused], fused, e, spec, canonical, dtype, rows)
    return refs


# ---- writing ------------------------------------------------------------------------------------------------

@dataclass
class _Planned:
    name: str                   # GGUF name
    sources: list[str]          # canonical tensors, stacked when several (experts)
    shape: tuple[int, ...]      # numpy shape as written
    type_name: str              # ggml type


def _tensor_type(gguf_name: str, shape: tuple[int, ...], outtype: str) -> str:
    """llama.cpp's converter policy: norms, 1-D tensors and the router in F32; rows that do not fill whole
    quantization blocks fall back to F16."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or "ffn_gate_inp" in gguf_name:
        return "F32"
    if outtype in ("F32", "F16", "BF16"):
        return outtype
    gguf = _gguf()
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[outtype]][0]
    return outtype if shape[-1] % block == 0 else "F16"


def plan_tensors(spec: ModelSpec, names: list[str], outtype: str) -> list[_Planned]:
    to_gguf = _gguf_names(spec)
    shapes = expected_shapes(spec)
    plan = []
    for canonical in names:
        if "block_sparse_moe.experts." in canonical:  # written stacked, after their router
            continue
        gguf_name = to_gguf[canonical]
        shape = shapes[canonical]
        plan.append(_Planned(gguf_name, [canonical], shape, _tensor_type(gguf_name, shape, outtype)))
        if canonical.endswith("block_sparse_moe.gate.weight"):  # the experts follow their router
            layer = int(canonical.split(".")[2])
            for canonical_t, _, stacked, _ in EXPERT_TENSORS:
                sources = [f"model.layers.{layer}." + canonical_t.format(E=e) for e in range(spec.num_experts)]
                shape = (spec.num_experts,) + shapes[sources[0]]
                name = f"blk.{layer}.{stacked}"
                plan.append(_Planned(name, sources, shape, _tensor_type(name, shape, outtype)))
    return plan


def _nbytes(shape: tuple[int, ...], type_name: str) -> int:
    gguf = _gguf()
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return math.prod(shape) // block * size


def _encode(tensor: torch.Tensor, type_name: str) -> np.ndarray:
    if type_name == "F32":
        return tensor.to(torch.float32).contiguous().numpy()
    if type_name == "F16":
        return tensor.to(torch.float16).contiguous().numpy()
    if type_name == "BF16":
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    gguf = _gguf()
    return gguf.quants.quantize(tensor.to(torch.float32).contiguous().numpy(), gguf.GGMLQuantizationType[type_name])


def _add_card(writer, card: dict) -> None:
    """What the source's model card says, under the keys llama.cpp's converter writes from it: general.license
    (and license.name), general.languages, general.base_model.N.* for each model it was made from."""
    if card.get("license"):
        writer.add_license(card["license"])
    if card.get("license_name"):
        writer.add_license_name(card["license_name"])
    languages = card.get("language")
    if languages:
        writer.add_languages([languages] if isinstance(languages, str) else list(languages))
    bases = card.get("base_model")
    bases = [bases] if isinstance(bases, str) else list(bases or [])
    if bases:
        writer.add_base_model_count(len(bases))
        for i, base in enumerate(bases):
            org, _, name = base.rpartition("/")
            writer.add_base_model_name(i, name)
            if org:
                writer.add_base_model_organization(i, org)
                writer.add_base_model_repo_url(i, f"https://huggingface.co/{base}")


def _add_metadata(writer, ckpt: Checkpoint, file_type: int, quantized: bool) -> None:
    """The header as llama.cpp's converter writes it, through gguf-py's adders (each writes its key with the value
    type llama.cpp reads: UINT32 counts, FLOAT32 for rope.freq_base and the norm epsilon)."""
    gguf = _gguf()
    spec = ckpt.spec
    g = gguf.Keys.General
    general = ckpt.source_config if ckpt.layout == "gguf" else {}
    writer.add_type("model")
    name = general.get(g.NAME) or ckpt.path.resolve().stem.replace("_", " ")  # "." names its folder
    writer.add_key_value(g.NAME, name, gguf.GGUFValueType.STRING)  # add_name would leave out an empty name
    for key, add in ((g.BASENAME, writer.add_basename), (g.FINETUNE, writer.add_finetune),
                     (g.SIZE_LABEL, writer.add_size_label), (g.LICENSE, writer.add_license),
                     (g.ORGANIZATION, writer.add_organization), (g.VERSION, writer.add_version)):
        if general.get(key):
            add(general[key])
    if ckpt.layout != "gguf":
        _add_card(writer, source_card(ckpt.path))
    writer.add_block_count(spec.num_layers)
    writer.add_context_length(spec.max_position_embeddings)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    if spec.is_moe:
        writer.add_expert_count(spec.num_experts)
        writer.add_expert_used_count(spec.experts_per_tok)
    writer.add_vocab_size(spec.vocab_size)
    writer.add_rope_dimension_count(spec.head_dim)
    if spec.head_dim != spec.hidden_size // spec.num_heads:
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
    writer.add_file_type(file_type)
    if quantized:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(writer, ckpt.vocab, spec)


def _add_vocab(writer, vocab: Vocab | None, spec: ModelSpec) -> None:
    if vocab is None:
        note("warning: no tokenizer found; the GGUF has no vocabulary (llama.cpp cannot run it)")
        return
    tokens, scores, types = list(vocab.tokens), list(vocab.scores), list(vocab.types)
    for i in range(len(tokens), spec.vocab_size):  # llama.cpp pads like this when the model has more rows
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre or "default")
    # gguf-py types an array by its items: STRING tokens, FLOAT32 scores and INT32 token types for these
    writer.add_token_list(tokens)
    writer.add_token_scores([float(s) for s in scores])
    writer.add_token_types([int(t) for t in types])
    if vocab.model == "gpt2":
        if not vocab.merges:  # gguf-py would leave the key out, and llama.cpp refuses such a file
            raise MixqError("the tokenizer is a byte-level BPE (gpt2) without merges: llama.cpp cannot load its "
                            "GGUF; pass a tokenizer.json that has them")
        writer.add_token_merges(list(vocab.merges))
    for value, add in ((vocab.bos_id, writer.add_bos_token_id), (vocab.eos_id, writer.add_eos_token_id),
                       (vocab.unk_id, writer.add_unk_token_id), (vocab.pad_id, writer.add_pad_token_id)):
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.model == "llama":
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def write_gguf(ckpt: Checkpoint, path: Path, outtype: str, split_max_size: int = 0) -> list[Path]:
    """Write `ckpt` as GGUF of a GGUF_PY_TYPES `outtype` at `path` (split into -0000N-of-0000M files when
    split_max_size is set)."""
    gguf = _gguf()
    spec = ckpt.spec
    type_name, ftype = GGUF_PY_TYPES[outtype]
    plan = plan_tensors(spec, list(ckpt.tensors), type_name)
    quantized = any(p.type_name not in FLOAT_TYPES for p in plan)
    writer = gguf.GGUFWriter(path, ARCH, split_max_size=split_max_size)
    gguf_stream.check(writer)
    _add_metadata(writer, ckpt, _file_type(ftype), quantized)
    for p in plan:
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), _nbytes(p.shape, p.type_name),
                               raw_dtype=gguf.GGMLQuantizationType[p.type_name])
    paths = writer.format_shard_names(path)
    try:
        _write_all(writer, ckpt, spec, plan, path)
    except BaseException:  # close the files (a full disk stays busy while a deleted file is open), re-raise
        gguf_stream.close_files(writer)
        raise
    writer.close()
    return paths


def _write_all(writer, ckpt: Checkpoint, spec: ModelSpec, plan: list[_Planned], path: Path) -> None:
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with bar(total=sum(_nbytes(p.shape, p.type_name) for p in plan), desc="writing gguf", unit="B",
             unit_scale=True) as pbar, ThreadPoolExecutor(max_workers=2) as pool:
        for p in plan:
            heads = rotary_heads(spec, p.sources[0])

            def encode(name, p=p, heads=heads):
                tensor = ckpt.get(name)
                return name, _encode(half_to_interleaved(tensor, heads) if heads else tensor, p.type_name)

            # stacked experts are written one expert at a time, the next one encoded while one is written
            encoded = pool.map(encode, p.sources) if len(p.sources) > 1 else map(encode, p.sources)
            gguf_stream.write_parts(writer, encoded, _nbytes(p.shape, p.type_name), written=ckpt.release)
            pbar.update(_nbytes(p.shape, p.type_name))


OUTTYPE_FIELD = "{outtype}"


def write_gguf_file(ckpt: Checkpoint, out: Path, outtype: str | list[str] = "auto", split_max_size=None,
                    force: bool = False, imatrix: Imatrix | Callable[[], Imatrix] | None = None,
                    imatrix_name: str = "auto") -> dict:
    """`mixq convert ... --to gguf`: gguf-py's types directly, K-quants and i-quants through llama.cpp's quantizer
    (with `imatrix`, llama.cpp's importance matrix, when given, or a function making it, called once the outputs
    are known free; `imatrix_name` is what the files record of it).
    Several outtypes are written in one run, `out` naming each with {outtype}: the quantizer's types all made from
    one float intermediate (for Mixtral a 93 GB write saved per extra type), which is itself the f16/bf16/f32
    output when that is asked for too."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise MixqError(f"{out}: a GGUF output path must end in .gguf")
    split = parse_size(split_max_size) if split_max_size else 0
    requested = [outtype] if isinstance(outtype, str) else list(outtype)
    if len(requested) > 1 and OUTTYPE_FIELD not in out.name:
        raise MixqError(f"{out}: several --outtype need {OUTTYPE_FIELD} in the output name, e.g. "
                        f"model-{OUTTYPE_FIELD}.gguf")
    base = {torch.bfloat16: "bf16", torch.float32: "f32"}.get(ckpt.main_dtype(), "f16")
    outtypes = []
    for t in (t.lower() for t in requested):
        if t == "auto":  # llama.cpp's guess: keep bf16 and f16, else f16
            t = {torch.bfloat16: "bf16", torch.float32: "f16"}.get(ckpt.main_dtype(), "f16")
        if t not in GGUF_PY_TYPES and t not in LLAMA_CPP_TYPES:
            raise MixqError(f"unknown GGUF outtype {t!r} (choose from auto, "
                            f"{', '.join(list(GGUF_PY_TYPES) + list(LLAMA_CPP_TYPES))})")
        if t not in outtypes:
            outtypes.append(t)
    kquants = [t for t in outtypes if t in LLAMA_CPP_TYPES]
    if imatrix is not None and not kquants:
        raise MixqError(f"--imatrix is used only by llama.cpp's quantizer: add a K-quant or i-quant --outtype "
                        f"({', '.join(list(LLAMA_CPP_TYPES)[:4])}, ...)")
    refuse_without_imatrix(kquants, imatrix)
    if kquants and split:
        raise MixqError("--split-max-size cannot be combined with K-quants (llama.cpp's quantizer writes one file); "
                        "split the result with llama.cpp's gguf-split")
    targets = {t: out.with_name(out.name.replace(OUTTYPE_FIELD, t)) for t in outtypes}
    refuse_existing(list(targets.values()), force)
    with contextlib.ExitStack() as claims:
        for target in targets.values():
            claims.enter_context(claim(target))
        if callable(imatrix):
            imatrix = imatrix()
        if imatrix is not None:
            imatrix.check_shapes({p.name: tuple(reversed(p.shape)) for p in
                                  plan_tensors(ckpt.spec, list(ckpt.tensors), GGUF_PY_TYPES[base][0])},
                                 f"importance matrix {imatrix_name}")
        quantizer = Quantizer(imatrix, imatrix_name) if kquants else None
        with scratch_beside(targets[outtypes[0]]) as stage:
            written = {t: write_gguf(ckpt, stage / targets[t].name, t, split)
                       for t in outtypes if t not in LLAMA_CPP_TYPES}
            if kquants:  # a float GGUF first (the float output itself when there is one), then llama.cpp's quantizer
                intermediate = written[base][0] if base in written else \
                    write_gguf(ckpt, stage / f"intermediate-{base}.gguf", base)[0]
                for t in kquants:
                    note(f"quantizing to {t.upper()} with llama.cpp"
                         + (f", importance matrix {imatrix_name}" if imatrix else ""))
                    quantizer(intermediate, stage / targets[t].name, t)
                    written[t] = [stage / targets[t].name]
            finals = publish([f for t in outtypes for f in written[t]], out.parent, force)
    return {"tensors": len(ckpt.tensors), "bytes": sum(f.stat().st_size for f in finals), "shards": len(finals),
            "files": [str(f) for f in finals], "outtype": outtypes[0] if isinstance(outtype, str) else outtypes,
            "tokenizer": ["gguf vocabulary"] if ckpt.vocab else [],
            "imatrix": None if imatrix is None else {"name": imatrix_name, "entries": len(imatrix.entries),
                                                     "datasets": imatrix.datasets, "chunks": imatrix.chunk_count}}
