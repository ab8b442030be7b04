"""The layer-streaming engine: one decoder layer in memory at a time, calibrated on the outputs of the layers
already quantized, written as it is finished, resumable from the last finished layer."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mixq.convert import open_checkpoint
from mixq.convert.architecture import EXPERT_NAMINGS, expert_modules, plan, spelled
from mixq.convert.checkpoint import Checkpoint, torch_name
from mixq.convert.errors import MixqError
from mixq.convert.hf import (
    config_from_spec,
    generation_config,
    write_json,
    write_safetensors_shards,
    write_tokenizer_files,
)
from mixq.convert.output import claim, refuse_existing, refuse_overlap, replace_path, staged_file, write_file
from mixq.convert.progress import bar, human_bytes, note
from mixq.convert.provenance import published, source_card
from mixq.convert.safetensors_io import SafetensorsFile, SafetensorsWriter
from mixq.convert.spec import ModelSpec

from .background import Ahead, Behind
from .device import compute_dtype, pick_device
from .formats import Format, get_format
from .forward import Rotary, decoder_layer
from .gptq_solver import REFIT_BYTES
from .memory import Budget, activation_bytes, host_memory_to_spare, tensor_bytes
from .methods import layer_method
from .quantizer import SEARCHES, QuantizedWeight, Scheme
from .runtimes import verdicts

EXPERT_STATISTICS = {
    "gptq": "every expert's Hessians from all calibration tokens",
    "awq": "w1/w3 scales from all tokens; each w2 from the tokens routed to its expert (all tokens when none are)",
}
EXPERT_STATISTICS["awq_gptq"] = f"AWQ: {EXPERT_STATISTICS['awq']}; GPTQ: {EXPERT_STATISTICS['gptq']}"
OUTPUT_DTYPE = torch.float16    # what AWQ and GPTQ repositories store their floating-point tensors in
STATE = "state.json"
NOT_NUMBERS = ("shard_size", "device_memory", "checkpoint_every")   # settings that never change an output byte


@dataclass
class Settings:
    method: str                          # "rtn" | "gptq" | "awq"
    scheme: Scheme
    fmt: str                             # "gptq" | "awq": the output format (formats.FORMATS)
    expert_naming: str = "classic"
    damp: float = 0.01                   # GPTQ
    act_order: bool = True               # columns in order of decreasing Hessian diagonal (desc_act in the config)
    static_groups: bool = True
    true_sequential: bool = True
    block_size: int = 128
    grid: int = 20                       # AWQ
    clip: bool = True
    duo_scaling: bool = True
    scale_router: bool = True
    awq_gptq: bool = False               # AWQ's scales, then GPTQ's solve (methods/awq_gptq.py), either format
    gptaq: bool = False                  # GPTQ against the unquantized model's inputs too (gptq_solver.Sweep.add)
    refit: bool = False                  # GPTQ's group scales refit to its codes (gptq_solver.refit_scales)
    device: str = "auto"
    dtype: str = "auto"
    batch: int = 8                       # calibration samples per forward chunk
    shard_size: int = 5_000_000_000
    device_memory: int | str | None = None   # bytes on the device at once (memory.Budget); never changes the numbers
    checkpoint_every: int = 1            # layers between resume checkpoints (each saves the next layer's inputs)

    @property
    def format(self) -> Format:
        return get_format(self.fmt)

    @property
    def reference_stream(self) -> bool:
        """Whether the unquantized model's hidden states are carried beside the quantized ones (GPTAQ)."""
        return self.gptaq and self.engine in ("gptq", "awq_gptq")

    @property
    def engine(self) -> str:
        """The layer method that runs (methods.METHODS): the command's, or AWQ then GPTQ for --awq-gptq."""
        return "awq_gptq" if self.awq_gptq and self.method != "rtn" else self.method

    def as_dict(self) -> dict:
        d = asdict(self)
        d["scheme"] = self.scheme.as_dict()
        return d

    def fingerprint(self) -> str:
        keep = {k: v for k, v in self.as_dict().items() if k not in NOT_NUMBERS}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class LayerContext:
    """What a method sees of one layer: its weights (mutable: AWQ rescales them) and its calibration inputs.

    The inputs, and whatever a method keeps of the same size, live at `home`: the device when the budget holds
    them, host memory when it does not. A method works on them one chunk of `settings.batch` samples at a time
    (`inputs(chunk)` brings one to the device, `keep(t)` sends a result home), always in the same chunks whatever
    the budget, so where they live never changes a number."""
    index: int
    spec: ModelSpec
    weights: dict[str, torch.Tensor]     # layer-relative names with ".weight", compute dtype, on the device
    x: torch.Tensor | None               # [samples, seqlen, hidden] inputs of the layer, at home (None for RTN)
    rope: Rotary | None
    settings: Settings
    stats: dict = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    home: torch.device = torch.device("cpu")
    sweep: int = 1                       # GPTQ: expert matrices swept together (memory.Budget's choice)
    x_ref: torch.Tensor | None = None    # GPTAQ: the same inputs as the unquantized model computes them, at home
    settled: set = field(default_factory=set)   # modules whose weights are their quantized values already

    def chunks(self):
        for start in range(0, self.x.shape[0], self.settings.batch):
            yield slice(start, start + self.settings.batch)

    def inputs(self, chunk: slice) -> torch.Tensor:
        return self.x[chunk].to(self.device)

    def reference_inputs(self, chunk: slice) -> torch.Tensor:
        return self.x_ref[chunk].to(self.device)

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.home)

    def w(self, module: str) -> torch.Tensor:
        return self.weights[f"{module}.weight"]

    def settle(self, module: str, quantized: QuantizedWeight) -> None:
        """From now on the layer computes with `module` quantized (GPTQ's later stages read it so); the engine
        settles what a method has not before the layer's outputs are computed."""
        weight = self.w(module)
        self.weights[f"{module}.weight"] = quantized.dequantize(weight.dtype).to(weight.device)
        self.settled.add(module)


def validate(spec: ModelSpec, settings: Settings) -> None:
    fmt, scheme = settings.format, settings.scheme
    if fmt.bits_problem(scheme.bits):
        raise MixqError(f"--bits {fmt.bits_problem(scheme.bits)}")
    if scheme.group_size <= 0:
        raise MixqError(f"--group-size {scheme.group_size}: must be positive")
    if scheme.search not in SEARCHES:
        raise MixqError(f"--search {scheme.search}: unknown (choose from {', '.join(SEARCHES)})")
    if settings.expert_naming not in EXPERT_NAMINGS:
        raise MixqError(f"unknown expert naming {settings.expert_naming!r} (choose from {', '.join(EXPERT_NAMINGS)})")
    for option, what in GPTQ_OPTIONS.items():
        if getattr(settings, option) and settings.engine not in ("gptq", "awq_gptq"):
            raise MixqError(f"--{option} {what}: AWQ needs --awq-gptq with it")
    if "g_idx" not in fmt.suffixes and settings.engine != "awq" and settings.act_order and not settings.static_groups:
        raise MixqError(f"--act-order without static groups: the {fmt.title} format has no g_idx to hold its "
                        "column order")
    for lin in plan(spec).linears:
        if problem := fmt.layout_problem(lin.shape, scheme):
            raise MixqError(f"model.layers.0.{lin.module}: {problem}")


# options of GPTQ's solve, and what each does (AWQ takes them with --awq-gptq only)
GPTQ_OPTIONS = {"gptaq": "calibrates GPTQ's solve", "refit": "refits GPTQ's scales"}


# tensors the size of the calibration activations a method keeps at once, beside the layer's inputs and outputs:
# GPTQ the post-attention norm's outputs; AWQ those of both norms, the attention context, the reference output of
# the group being searched and the down projections' routed inputs (about one more for Mixtral)
METHOD_COPIES = {"rtn": 0, "gptq": 1, "awq": 5, "awq_gptq": 5}   # AWQ's are freed before GPTQ's are kept


def layer_bytes(spec: ModelSpec, dtype: torch.dtype) -> int:
    """One decoder layer's weights in `dtype`."""
    return sum(tensor_bytes(s, dtype) for s in plan(spec).tensor_shapes.values())


def layer_working_set(spec: ModelSpec, settings: Settings, dtype: torch.dtype, seqlen: int) -> int:
    """Device bytes quantizing one layer needs beside the calibration activations: the layer's weights, their
    unquantized copy and the dequantized result; GPTQ's largest Hessian with its factors, or AWQ's widest smoothing
    group in fp32 beside its fake-quantized trial (or its largest one-linear group's Gram matrix, if larger); one
    chunk's activations."""
    layer_plan = plan(spec)
    layer = layer_bytes(spec, dtype)
    solver = 0
    if settings.engine in ("gptq", "awq_gptq"):
        widest = max(lin.shape[1] for lin in layer_plan.linears)
        # H, its factor and their scratch; GPTAQ also the cross products and the drift made of them
        solver = (4 + (2 if settings.reference_stream else 0)) * widest * widest * 4
        if settings.refit:   # the swept weight and its H kept for the refit, and its temporaries
            largest = max(sum(layer_plan.shape(m)[0] for m in mods) * layer_plan.shape(mods[0])[1]
                          for mods in layer_plan.groups.values())
            solver += widest * widest * 4 + largest * 4 + REFIT_BYTES
    if settings.engine in ("awq", "awq_gptq"):   # one after the other: the larger of the two
        group = max(sum(math.prod(layer_plan.shape(m)) for m in g.linears) for g in layer_plan.smoothings)
        # a one-linear group's Gram matrix beside its weight in fp32, the trial's error and its product
        singles = [layer_plan.shape(g.linears[0]) for g in layer_plan.smoothings if len(g.linears) == 1]
        own = max(((cols + 3 * rows) * cols * 4 for rows, cols in singles), default=0)
        solver = max(solver, group * (4 + dtype.itemsize), own)
    return 3 * layer + solver + (activation_bytes(spec, settings.batch, seqlen) if seqlen else 0)


def sweep_matrix_bytes(spec: ModelSpec, settings: Settings) -> int:
    """What one more expert matrix in a GPTQ sweep costs: its weight in fp32, its codes, its inverse-Hessian
    factor and its static groups' parameters; with --refit its weight and H again."""
    rows, cols = plan(spec).shape(expert_modules(0)[2]) if spec.is_moe else (0, 0)
    kept = (rows * cols + cols * cols) * 4 if settings.refit else 0
    return rows * cols * 5 + cols * cols * 4 + 2 * rows * (cols // settings.scheme.group_size) * 4 + kept


def plan_memory(spec: ModelSpec, settings: Settings, blocks, device: torch.device, dtype: torch.dtype,
                budget: Budget) -> tuple[torch.device, int, str]:
    """Where the calibration activations live (the device when the budget holds them beside one layer's working
    set, host memory otherwise), how many expert matrices GPTQ sweeps at once (as many as the room left holds;
    never a number changed), and the plan in one line; a budget that cannot hold the working set is refused."""
    seqlen = blocks.tokens.shape[1] if blocks is not None else 0
    working = layer_working_set(spec, settings, dtype, seqlen)
    budget.require(working, f"quantizing one layer with {settings.engine.upper().replace('_', '+')}")
    home, where = device, "none"
    if blocks is not None:
        # GPTAQ: the reference stream, its next layer's inputs and the reference post-attention norms
        streams = 2 + METHOD_COPIES[settings.engine] + (3 if settings.reference_stream else 0)
        copies = streams * tensor_bytes((*blocks.tokens.shape, spec.hidden_size), dtype)
        if budget.fits(working + copies):
            budget.keep(copies)
            where = "on the device"
        else:
            home, where = torch.device("cpu"), "in host memory"
        where = f"{human_bytes(copies)} {where}"
    sweep, swept = 1, ""
    if settings.engine in ("gptq", "awq_gptq") and spec.is_moe:
        per = sweep_matrix_bytes(spec, settings)
        sweep = max(1, min(spec.num_experts, (budget.room() - working) // per + 1))
        working += (sweep - 1) * per
        swept = f", {sweep} of {spec.num_experts} expert down projections swept at once"
    budget.passing(working)
    return home, sweep, (f"device memory {budget.describe()}: one layer's working set {human_bytes(working)}, "
                         f"calibration activations {where}{swept}")


def layer_outputs(ctx: LayerContext, weights: dict[str, torch.Tensor], counts: torch.Tensor | None = None,
                  reference: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, float]:
    """The layer's outputs on its calibration inputs; with `reference` weights also the relative error of the
    outputs against that unquantized layer. The error is measured on the first chunk only: it is a statistic for
    the report, and the reference forward over every chunk would cost a whole unquantized forward of the layer
    (15/16 of one at Mixtral's 128 samples) that nothing else reads."""
    out = torch.empty_like(ctx.x)
    error = 0.0
    for i, chunk in enumerate(ctx.chunks()):
        x = ctx.inputs(chunk)
        y = decoder_layer(x, weights, ctx.spec, ctx.rope, counts)
        if reference is not None and i == 0:
            y_ref = decoder_layer(x, reference, ctx.spec, ctx.rope)
            ref_norm = float((y_ref - x).float().pow(2).sum())
            error = math.sqrt(float((y - y_ref).float().pow(2).sum()) / ref_norm) if ref_norm else 0.0
        out[chunk] = ctx.keep(y)
    return out, error


def reference_outputs(ctx: LayerContext, original: dict[str, torch.Tensor]) -> torch.Tensor:
    """The unquantized layer's outputs on the unquantized model's inputs: the next layer's reference stream."""
    out = torch.empty_like(ctx.x_ref)
    for chunk in ctx.chunks():
        out[chunk] = ctx.keep(decoder_layer(ctx.reference_inputs(chunk), original, ctx.spec, ctx.rope))
    return out


class Work:
    """The folder beside the output where layers accumulate; it survives a crash so --resume can continue."""

    def __init__(self, out: Path):
        self.path = out.parent / f".{out.name}.mixq-partial"

    def layer_file(self, layer: int) -> Path:
        return self.path / f"layer-{layer:05d}.safetensors"

    def state(self, num_layers: int) -> dict | None:
        """The saved progress, or None when there is none; a damaged one is refused, never half-trusted."""
        if not (self.path / STATE).exists():
            return None
        try:
            state = json.loads((self.path / STATE).read_text())
            done = state["next_layer"]
            ok = isinstance(state["layers"], list) and isinstance(done, int) and 0 <= done <= num_layers \
                and len(state["layers"]) == done and "key" in state
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
            ok = False
        if not ok:
            raise self.damaged(STATE)
        for layer in range(done):
            if not self.layer_file(layer).is_file():
                raise self.damaged(self.layer_file(layer).name)
        return state

    def damaged(self, what: str) -> MixqError:
        return MixqError(f"{self.path}: work folder of an interrupted run is damaged ({what}); run without "
                         f"--resume to start over")

    def save(self, state: dict, hidden: torch.Tensor | None) -> None:
        if hidden is not None:
            with staged_file(self.path / "hidden.pt") as tmp:
                torch.save(hidden, tmp)   # on the host already: the loop copied it there
        write_file(self.path / STATE, json.dumps(state, indent=1))

    def hidden(self, device, streams: int = 1) -> torch.Tensor:
        """The next layer's inputs; with two streams (GPTAQ) the quantized and the reference ones, stacked."""
        try:
            hidden = torch.load(self.path / "hidden.pt", map_location=device, weights_only=True)
        except Exception:  # any unpickling failure of our own file: damaged, not a bug
            raise self.damaged("hidden.pt") from None
        if not isinstance(hidden, torch.Tensor) or (streams > 1 and (hidden.dim() != 4 or hidden.shape[0] != streams)):
            raise self.damaged("hidden.pt")
        return hidden


def check_inputs(model: str | Path, out: str | Path, settings: Settings, force: bool = False) -> Checkpoint:
    """Everything that can be refused before any work: the source, the settings, the output path."""
    model = Path(model)
    ckpt = open_checkpoint(model)
    if ckpt.layout != "hf":
        raise MixqError(f"{model}: quantization reads Hugging Face checkpoints, this is {ckpt.layout}; "
                        f"convert it first: mixq convert {model} DIR --to hf")
    validate(ckpt.spec, settings)
    refuse_overlap([model], Path(out))
    refuse_existing([Path(out)], force)
    return ckpt


def quantize_model(model: str | Path, out: str | Path, settings: Settings, blocks=None, force: bool = False,
                   resume: bool = False) -> dict:
    """Quantize the HF checkpoint `model` into a repository at `out`; returns the report."""
    started = time.perf_counter()
    model, out = Path(model), Path(out)
    ckpt = check_inputs(model, out, settings, force)
    if settings.method != "rtn" and blocks is None:
        raise MixqError(f"{settings.method.upper()} needs calibration data (--calib)")
    if blocks is not None and blocks.tokens.numel() and not 0 <= blocks.tokens.min() <= blocks.tokens.max() \
            < ckpt.spec.vocab_size:  # an id of -1 would silently read the last embedding row
        raise MixqError(f"{blocks.provenance.get('prepared_file') or blocks.provenance.get('source')}: token ids "
                        f"{int(blocks.tokens.min())}..{int(blocks.tokens.max())} fall outside the model's "
                        f"vocabulary of {ckpt.spec.vocab_size}")
    with claim(out):  # one writer per output, its work folder included
        return _quantize(ckpt, model, out, settings, blocks, force, resume, started)


def _quantize(ckpt: Checkpoint, model: Path, out: Path, settings: Settings, blocks, force: bool, resume: bool,
              started: float) -> dict:
    spec = ckpt.spec
    device = pick_device(settings.device)
    dtype = compute_dtype(settings.dtype, device)
    budget = Budget.for_device(settings.device_memory, device)
    # refuses a budget too small
    home, sweep, memory_plan = plan_memory(spec, settings, blocks, device, dtype, budget)
    work = Work(out)
    calibration = dict(blocks.provenance) if blocks is not None else None
    key = {"settings": settings.fingerprint(), "model": str(model.resolve()),
           "calibration": hashlib.sha256(blocks.tokens.numpy().tobytes()).hexdigest() if blocks is not None else None}
    state = work.state(spec.num_layers) if resume else None
    if state is not None and state.get("key") != key:
        raise MixqError(f"{work.path}: was started with other settings, model or calibration; run without --resume "
                        f"to start over")
    if state is None:
        shutil.rmtree(work.path, ignore_errors=True)
        work.path.mkdir(parents=True)
        state = {"key": key, "next_layer": 0, "layers": []}
    elif state["next_layer"]:
        note(f"resuming at layer {state['next_layer']} of {spec.num_layers}")

    x = rope = x_ref = None
    if blocks is not None:
        seqlen = blocks.tokens.shape[1]
        rope = Rotary.build(spec, seqlen, device, dtype)
        if state["next_layer"] == 0:
            embed = ckpt.get("model.embed_tokens.weight")
            x = embed[blocks.tokens].to(device=home, dtype=dtype)
            ckpt.release("model.embed_tokens.weight")
        elif state["next_layer"] < spec.num_layers:   # none when only the assembly was left
            x = work.hidden(home, streams=2 if settings.reference_stream else 1)
        if settings.reference_stream and x is not None:   # both streams start from the same embeddings
            x, x_ref = (x, x) if state["next_layer"] == 0 else x.unbind(0)
    quantize_layer = layer_method(settings.engine)
    note(memory_plan)
    layers = range(state["next_layer"], spec.num_layers)
    # the next layer is read ahead into host memory when the host can spare it (and, on a CPU, no budget caps it)
    one_layer = layer_bytes(spec, dtype)
    ahead = 2 * one_layer <= host_memory_to_spare() and (device.type != "cpu" or budget.limit is None)
    reading = Ahead(lambda i: ckpt.layer(i, "cpu" if ahead else device, dtype), layers, enabled=ahead)
    if ahead and len(layers) > 1:
        note(f"reading each next layer ({human_bytes(one_layer)}) into host memory while one is quantized")
    with reading, Behind("writer") as writer, \
            bar(total=spec.num_layers, initial=state["next_layer"], desc=f"{settings.method} layers",
                unit="layer") as pbar:
        for layer, weights in reading:
            t0 = time.perf_counter()
            weights = {name: tensor.to(device) for name, tensor in weights.items()}
            original = dict(weights) if x is not None else None
            ctx = LayerContext(layer, spec, weights, x, rope, settings, device=device, home=home, sweep=sweep,
                               x_ref=x_ref)
            quantized = quantize_layer(ctx)
            for module in quantized.keys() - ctx.settled:
                ctx.settle(module, quantized[module])
            record = {"layer": layer, **ctx.stats}
            if x is not None:
                counts = torch.zeros(max(spec.num_experts, 1), dtype=torch.long)
                x, record["output_error"] = layer_outputs(ctx, weights, counts, original)
                if x_ref is not None:
                    x_ref = reference_outputs(ctx, original)
                if spec.is_moe:
                    record["routed_tokens"] = counts.tolist()
            tensors = layer_tensors(layer, spec, quantized, weights, settings)
            record["seconds"] = round(time.perf_counter() - t0, 3)
            state["layers"].append(record)
            state["next_layer"] = layer + 1
            last = layer + 1 == spec.num_layers
            saved = dict(state, layers=list(state["layers"])) \
                if last or (layer + 1) % settings.checkpoint_every == 0 else None
            hidden = None
            if saved is not None and not last and x is not None:
                hidden = (x if x_ref is None else torch.stack([x, x_ref])).cpu()
            writer.submit(_write_and_save, work, layer, tensors, saved, hidden)
            del weights, original, ctx, quantized, tensors, hidden
            pbar.update(1)
            pbar.set_postfix(err=f"{record.get('output_error', 0):.4f}")

    return _finish(ckpt, out, work, settings, state, calibration, device, dtype, force, started, budget, memory_plan)


def layer_tensors(layer: int, spec: ModelSpec, quantized: dict[str, QuantizedWeight],
                  weights: dict[str, torch.Tensor], settings: Settings) -> dict[str, torch.Tensor]:
    """The layer's tensors as its file stores them, packed and on the host (what the writer needs of the layer)."""
    tensors = {}
    prefix = f"model.layers.{layer}."
    layer_plan = plan(spec)
    for module in layer_plan.modules:
        name = prefix + spelled(module, settings.expert_naming)
        for suffix, tensor in settings.format.pack(quantized[module], settings.scheme).items():
            tensors[f"{name}.{suffix}"] = tensor.contiguous().cpu()
    for weight in layer_plan.unquantized:
        tensors[prefix + spelled(weight.removesuffix(".weight"), settings.expert_naming) + ".weight"] = \
            weights[weight].to(OUTPUT_DTYPE).contiguous().cpu()
    return tensors


def _write_layer(path: Path, layer: int, tensors: dict[str, torch.Tensor]) -> None:
    entries = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    with staged_file(path) as tmp, SafetensorsWriter(tmp, entries) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)


def _write_and_save(work: Work, layer: int, tensors: dict[str, torch.Tensor], state: dict | None,
                    hidden: torch.Tensor | None) -> None:
    """The writer's task: the layer's file, then (at a checkpoint) the progress that counts it and the next
    layer's inputs; between checkpoints the saved progress stays at the last one, and a resumed run redoes the
    layers after it (their files are rewritten whole)."""
    _write_layer(work.layer_file(layer), layer, tensors)
    if state is not None:
        work.save(state, hidden)


def output_plan(spec: ModelSpec, settings: Settings) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Every tensor of the output repository, in order, with shape and dtype."""
    h, v = spec.hidden_size, spec.vocab_size
    layer_plan = plan(spec)
    entries = [("model.embed_tokens.weight", (v, h), OUTPUT_DTYPE)]
    for layer in range(spec.num_layers):
        prefix = f"model.layers.{layer}."
        for lin in layer_plan.linears:
            name = prefix + spelled(lin.module, settings.expert_naming)
            for suffix, (shape, dtype) in settings.format.shapes(*lin.shape, settings.scheme).items():
                entries.append((f"{name}.{suffix}", shape, dtype))
        for weight in layer_plan.unquantized:
            name = prefix + spelled(weight.removesuffix(".weight"), settings.expert_naming) + ".weight"
            entries.append((name, layer_plan.tensor_shapes[weight], OUTPUT_DTYPE))
    entries.append(("model.norm.weight", (h,), OUTPUT_DTYPE))
    if not spec.tie_word_embeddings:
        entries.append(("lm_head.weight", (v, h), OUTPUT_DTYPE))
    return entries


def _finish(ckpt: Checkpoint, out: Path, work: Work, settings: Settings, state: dict, calibration: dict | None,
            device, dtype, force: bool, started: float, budget: Budget, memory_plan: str) -> dict:
    """Assemble the layer files and the rest of the repository into shards, then move it into place."""
    spec = ckpt.spec
    final = work.path / "repo"
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir()
    layer_files: dict[int, SafetensorsFile] = {}

    def produce(name: str) -> torch.Tensor:
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            if layer not in layer_files:
                layer_files.clear()
                layer_files[layer] = SafetensorsFile(work.layer_file(layer))
            return layer_files[layer].get(name).contiguous()
        tensor = ckpt.get(name).to(OUTPUT_DTYPE).contiguous()
        ckpt.release(name)
        return tensor

    write_safetensors_shards(final, output_plan(spec, settings), produce, settings.shard_size, desc="assembling")
    config = config_from_spec(spec, OUTPUT_DTYPE, ckpt.source_config)
    config["quantization_config"] = settings.format.quantization_config(settings, spec.is_moe)
    write_json(final / "config.json", config)
    for name in settings.format.extra_files:
        write_json(final / name, config["quantization_config"])
    write_json(final / "generation_config.json", ckpt.generation_config or generation_config(spec))
    write_tokenizer_files(final, ckpt.vocab)
    report = {
        "method": settings.method, "format": settings.fmt, "settings": settings.as_dict(),
        "model": str(ckpt.path), "source_card": source_card(ckpt.path), "architecture": spec.arch,
        "calibration": calibration,
        "device": str(device), "compute_dtype": torch_name(dtype), "device_memory": budget.limit,
        "peak_device_bytes": budget.peak_device_bytes(), "memory_plan": memory_plan,
        "layers": state["layers"], "files": sorted(p.name for p in final.iterdir()),
        "bytes": sum(p.stat().st_size for p in final.iterdir() if p.is_file()),
        "runtimes": [v.as_dict() for v in verdicts(settings, spec)],   # who refuses or slows these settings
    }
    if spec.is_moe and state["layers"] and "routed_tokens" in state["layers"][0]:
        routed = [r["routed_tokens"] for r in state["layers"]]
        report["expert_coverage"] = {"min_routed_tokens": min(min(r) for r in routed),
                                     "experts_without_routed_tokens": sum(c == 0 for r in routed for c in r),
                                     "expert_statistics": EXPERT_STATISTICS.get(settings.engine)}
    layer_files.clear()
    report["seconds"] = round(time.perf_counter() - started, 3)
    write_json(final / "report.json", published(report))
    report["files"].append("report.json")
    refuse_existing([out], force)
    replace_path(final, out)
    shutil.rmtree(work.path, ignore_errors=True)
    return report
