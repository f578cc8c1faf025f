"""Several processes, one model copy each (DDP): who this process is, where its copy goes, and the
rank-0-only parts of a run.

``torchrun --nproc_per_node N`` and ``accelerate launch`` start N copies of the same script and set
``RANK`` (0..world-1), ``LOCAL_RANK`` (the index on this machine) and ``WORLD_SIZE`` in each. The
process group itself is created later by accelerate, when the Trainer's arguments are built; until
then these variables are the only source of truth, afterwards ``torch.distributed`` is.

velotune's part is small, the rest is the Trainer's (transformers + accelerate wrap the model in
``DistributedDataParallel``, shard the batches, all-reduce the gradients):

- placement: each rank's whole model goes to ``cuda:LOCAL_RANK`` (``device_map="auto"`` would spread
  it over every GPU of the machine, which DDP cannot train); :func:`rank_device_map`;
- loss: the label tokens of the accumulated global batch are counted over all ranks, and each rank's
  loss is multiplied by the world size to undo DDP's gradient averaging (``velotune.training``);
- output: only rank 0 says notices, writes checkpoints (plus each rank's RNG state, transformers'
  design for exact resume), the run report and the exports; :func:`barrier` keeps the others waiting.
"""
from __future__ import annotations

import atexit
import gc
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ._notices import VelotuneError

# device_map strings that ask accelerate to split one model over several devices.
_SPREADING = ("balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class World:
    """This process's place among the launched ones: ``rank`` (global), ``local_rank`` (on this
    machine; its GPU index), ``size`` (number of processes, 1 without a launcher)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """True for rank 0, the process that logs, saves and exports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when several processes train together."""
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise VelotuneError(f"environment variable {name}={value!r} is not an integer; it is set by the launcher "
                            "(torchrun / accelerate launch): unset it to run one process") from None


def _dist():
    """``torch.distributed`` when a process group is up, else None (never imports torch itself)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def world() -> World:
    """This process's :class:`World`, from the process group when it is up, else from the launcher's
    environment variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``)."""
    dist = _dist()
    if dist is not None:
        rank = dist.get_rank()
        return World(rank=rank, local_rank=_env_int("LOCAL_RANK", rank), size=dist.get_world_size())
    rank = _env_int("RANK", 0)
    return World(rank=rank, local_rank=_env_int("LOCAL_RANK", rank), size=_env_int("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """True unless this is a rank other than 0 of a launched multi-process run."""
    return world().is_main


def barrier() -> None:
    """Wait until every rank gets here (no-op for one process). Every rank must call it, once."""
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def agree(value: int) -> int:
    """Rank 0's ``value`` on every rank (a barrier too); ``value`` itself for one process."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


_exit_hook = False


def destroy_at_exit() -> None:
    """Destroy the process group when the interpreter exits (registered once; no-op without one).

    accelerate creates the group and nothing tears it down; gloo's threads still alive at interpreter
    shutdown can then abort the process ("terminate called without an active exception", SIGABRT, seen
    in 1 of 3 CPU runs here), and torchrun reports a failed run after a complete one."""
    global _exit_hook
    if not _exit_hook:
        atexit.register(_destroy)
        _exit_hook = True


def _destroy() -> None:
    """Tear the process group down while the interpreter still runs: drop the references that would keep
    its C++ object (and gloo's worker threads) alive, destroy it, collect. Safe to call again, and without
    a group.

    ``destroy_process_group`` alone only empties torch's registry: DDP's reducer and logger (C++), FSDP2's
    mesh infos, and the default arguments of ``torch.distributed.nn.functional`` (``group=group.WORLD``,
    evaluated when torch._dynamo first imports it, after the group exists) still hold the group, so its
    threads lived on into interpreter finalisation, where a gloo thread releasing the last reference to
    finished work with Python-owned tensors must take the GIL: SIGABRT, about 1 rank exit in 60 on CPU
    (pytorch/pytorch#179291). Destroyed here, its threads are joined before finalisation starts.

    Only for gloo groups (CPU ranks, where the abort was seen): NCCL groups are destroyed as before until
    the GPU suite has run this teardown order on NCCL."""
    dist = _dist()
    if dist is None:
        return
    if dist.get_backend() != "gloo":
        dist.destroy_process_group()
        return
    _forget_groups(dist.ProcessGroup)
    dist.destroy_process_group()
    gc.collect()  # the group's last reference may sit in a reference cycle


def _forget_groups(group_type) -> None:
    """Drop the references Python objects hold to any process group (``group_type`` instances); the groups
    are about to be destroyed and unusable anyway."""
    for name, module in list(sys.modules.items()):  # default arguments bound to a group at import
        if module is None or not name.startswith("torch.distributed"):
            continue
        for fn in list(vars(module).values()):
            # type(), not isinstance(): the latter warns on the deprecated torch.distributed.reduce_op
            if type(fn) is types.FunctionType and fn.__defaults__ \
                    and any(isinstance(d, group_type) for d in fn.__defaults__):
                fn.__defaults__ = tuple(None if isinstance(d, group_type) else d for d in fn.__defaults__)
    ddp = getattr(sys.modules.get("torch.nn.parallel"), "DistributedDataParallel", None)
    for obj in gc.get_objects():
        if ddp is not None and issubclass(type(obj), ddp):
            # the reducer, and the logger that owns it, hold the group in C++, out of reach of the scan below
            obj.__dict__.pop("logger", None)
            obj.__dict__.pop("reducer", None)
            obj.__dict__["process_group"] = None
            continue
        module = getattr(type(obj), "__module__", None)
        # torch's objects (FSDP2's mesh infos, DeviceMesh's registry), but not torch's own registry of groups,
        # which destroy_process_group empties
        if not isinstance(module, str) or not module.startswith("torch.") \
                or module == "torch.distributed.distributed_c10d":
            continue
        attrs = getattr(obj, "__dict__", None)
        if not isinstance(attrs, dict):
            continue
        for key, value in list(attrs.items()):
            if isinstance(value, group_type):
                attrs[key] = None
            elif type(value) is dict:  # DeviceMesh._pg_registry: name -> group
                for name in [k for k, v in value.items() if isinstance(v, group_type)]:
                    del value[name]


def _devices_of(device_map) -> set[str]:
    """The set of devices a device_map names ("cuda:1", "cpu", "disk", ...)."""
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    out = set()
    for v in values:
        if isinstance(v, int) or (isinstance(v, str) and v.isdigit()):
            out.add(f"cuda:{int(v)}")
        elif str(v) == "cuda":
            out.add("cuda:0")
        else:
            out.add(str(v))
    return out


def rank_device_map(device_map, device_type: str, w: World, n_gpus: int):
    """The ``device_map`` for this rank's whole model copy under DDP, or a ``VelotuneError``.

    Args:
        device_map: what the user passed ("auto" / None, a device, or a dict module -> device).
        device_type: "cuda" or "cpu" (where this machine trains).
        w: this process's :class:`World` (``w.size > 1``).
        n_gpus: CUDA GPUs visible to this process.

    "auto" / None -> ``{"": LOCAL_RANK}`` on GPUs, ``{"": "cpu"}`` on a CPU machine. An explicit map is
    kept when it puts the whole model on this rank's own device; a map that splits the model over
    devices, offloads to CPU/disk, or puts two ranks on one GPU is refused with the fix.
    """
    if device_type != "cuda":
        return {"": "cpu"} if device_map in ("auto", None) else device_map
    if w.local_rank >= n_gpus:
        raise VelotuneError(
            f"LOCAL_RANK={w.local_rank} but this process sees {n_gpus} CUDA GPU(s): DDP needs one GPU per "
            f"process; launch at most {n_gpus} per machine (torchrun --nproc_per_node {n_gpus}) or make more "
            "GPUs visible (CUDA_VISIBLE_DEVICES)")
    own = f"cuda:{w.local_rank}"
    if device_map in ("auto", None):
        return {"": w.local_rank}
    if device_map in ("cpu", {"": "cpu"}):
        from ._notices import say_once

        say_once("rank-cpu-copy", "device_map=\"cpu\": each rank keeps its copy in host memory until FSDP shards it "
                 "(distributed.fsdp_shard, or SFTTrainer with fsdp=\"full_shard\"), which puts each rank's shards "
                 "on cuda:LOCAL_RANK: for a model bigger than one GPU. DDP cannot train copies on the CPU")
        return {"": "cpu"}
    if isinstance(device_map, str) and device_map in _SPREADING:
        devices = {"several GPUs"}
    else:
        devices = _devices_of(device_map)
    if devices == {own}:
        return device_map
    if len(devices) > 1 or devices & {"cpu", "disk", "meta", "several GPUs"}:
        raise VelotuneError(
            f"device_map={device_map!r} splits the model over {', '.join(sorted(devices))}, but DDP "
            f"({w.size} processes) trains one whole copy per GPU; drop device_map (the default \"auto\" puts "
            "rank r's copy on cuda:LOCAL_RANK), or run one process (python script.py) to split a model that "
            "does not fit on one GPU")
    (other,) = devices
    raise VelotuneError(
        f"device_map={device_map!r} puts rank {w.rank}'s model on {other}, but its LOCAL_RANK={w.local_rank} "
        f"owns {own}: ranks would share a GPU; drop device_map (\"auto\" picks {own} here) or pass "
        "device_map={'': int(os.environ['LOCAL_RANK'])}")


def fsdp_shard(model, mesh=None, reshard_after_forward: bool = True):
    """Shard a velotune model with FSDP2 (``torch.distributed.fsdp.fully_shard``) for a training loop
    of your own: each decoder layer is one FSDP unit, the rest (embeddings, final norm, lm_head) the
    root unit. Returns the model (sharded in place).

    The fast forward runs on the sharded model: each layer's fused kernels run inside the layer's own
    call, where FSDP has gathered its parameters, 4-bit weights included (bitsandbytes keeps their
    quant_state on the module; velotune reads it there). CUDA graphs and offloaded checkpointing are off
    for sharded layers. Call it after ``get_peft_model`` and before building the optimizer, in every
    process of a ``torchrun`` launch with the process group initialised; ``mesh`` defaults to all
    ranks on this process's device type. Gradients are averaged over ranks (FSDP's default), so each
    rank's loss should be its share of the global batch's mean.

    Save with :func:`fsdp_save_adapter` (the adapter, to export) or :func:`fsdp_save_checkpoint` (to resume
    with :func:`fsdp_load_checkpoint`). ``SFTTrainer`` with ``fsdp="full_shard"`` calls this itself.
    """
    from torch.distributed.fsdp import fully_shard

    d = _dist()
    if d is None:
        raise VelotuneError("fsdp_shard needs an initialised process group: launch with torchrun and call "
                            "torch.distributed.init_process_group() first")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None or "_velotune_fast" not in base.__dict__:
        raise VelotuneError("fsdp_shard takes a model loaded with FastLanguageModel.from_pretrained (a decoder "
                            "with model.layers)")
    float_storage_4bit(base)
    if mesh is None:
        import torch
        from torch.distributed.device_mesh import init_device_mesh

        # a model loaded with device_map="cpu" (bigger than one GPU) is sharded onto this rank's GPU
        device_type = "cuda" if torch.cuda.is_available() else next(base.parameters()).device.type
        if device_type == "cuda":
            torch.cuda.set_device(world().local_rank % torch.cuda.device_count())  # FSDP places shards here
        mesh = init_device_mesh(device_type, (d.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    _quant_states_to(base, _mesh_device(mesh))
    return model


def _mesh_device(mesh):
    import torch

    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def _quant_states_to(model, device) -> None:
    """bitsandbytes' 4-bit quant states (absmax, code, nested state: plain tensors, not parameters, so FSDP
    does not move them) onto ``device``, where FSDP put the shards: a model loaded on the CPU trains on the
    GPU. The weight's state and the module's copy (what velotune reads after FSDP gathers the weight)."""
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        for qs in {id(q): q for q in (getattr(w, "quant_state", None), getattr(mod, "quant_state", None))
                   if q is not None}.values():
            if qs.absmax.device != device:
                qs.to(device)


def float_storage_4bit(model) -> int:
    """Re-view every bitsandbytes 4-bit weight's packed uint8 storage as its compute dtype (the same bytes;
    bitsandbytes' ``quant_storage``, the field's FSDP-QLoRA layout): FSDP2 makes each sharded parameter an
    ``nn.Parameter`` of its storage dtype, which torch < 2.13 does with requires_grad=True, refused for
    integer tensors. Returns how many weights changed. velotune's kernels and bitsandbytes read the bytes
    whatever the storage dtype."""
    import torch

    from ._layers import is_4bit

    changed = 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if w is None or not is_4bit(w) or w.dtype.is_floating_point:
            continue
        qs = getattr(w, "quant_state", None) or getattr(mod, "quant_state", None)
        dtype = qs.dtype if qs is not None and qs.dtype.is_floating_point else torch.bfloat16
        if w.numel() % dtype.itemsize or not w.is_contiguous():
            raise VelotuneError(f"a 4-bit weight of {type(mod).__name__} has {w.numel()} packed bytes, which "
                                f"cannot be stored as {dtype} for FSDP; load the model with "
                                f"BitsAndBytesConfig(bnb_4bit_quant_storage={dtype})")
        w.data = w.data.reshape(-1).view(dtype).reshape(-1, 1)
        w.quant_storage = dtype
        changed += 1
    return changed


def fsdp_save_adapter(model, save_directory, **kwargs) -> None:
    """Save the LoRA adapter of an :func:`fsdp_shard`-ed model: ``model.save_pretrained`` of one process,
    from the gathered trainable weights. A collective: call it on every rank (each rank's shards are
    gathered; rank 0 writes, atomically as velotune's saves are, the others wait at a barrier).

    The adapter folder is the same as one process would write, so a merged 16-bit model or GGUF files
    come from it as usual, in one process: ``FastLanguageModel.from_pretrained(save_directory)`` then
    ``save_pretrained_merged`` / ``save_pretrained_gguf`` (or ``velotune export``).
    """
    d = _dist()
    if d is None:
        raise VelotuneError("fsdp_save_adapter is for a sharded model under torchrun; with one process call "
                            "model.save_pretrained(save_directory)")
    state = {}
    for name, p in model.named_parameters():  # the same order on every rank: one gather each
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            state[name] = full.detach().to("cpu", copy=True)
    if d.get_rank() == 0:
        from .export.atomic import atomic_directory

        with atomic_directory(save_directory) as tmp:
            model.save_pretrained(tmp, state_dict=state, **kwargs)
    d.barrier()


_TRAINABLE = "trainable.safetensors"
_OPTIMIZER = "optimizer.safetensors"
_OPTIMIZER_REST = "optimizer.json"
_STATE = "training_state.json"


def _dcp_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def gather_training_state(model, optimizer):
    """The trainable weights and the optimizer state of an FSDP2-sharded model, whole tensors on the CPU
    of rank 0 (empty dicts elsewhere). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _dcp_options(cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def write_training_state(folder: Path, weights: dict, optim: dict) -> None:
    """Rank 0's part of a save: ``trainable.safetensors`` (weights by parameter name), ``optimizer.safetensors``
    (state tensors by "name/key") and ``optimizer.json`` (settings and non-tensor state) into ``folder``."""
    import json

    import torch
    from safetensors.torch import save_file

    tensors, scalars = {}, {}
    for name, entries in optim["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().contiguous()
            else:
                scalars[f"{name}/{key}"] = value
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(folder / _TRAINABLE))
    save_file(tensors, str(folder / _OPTIMIZER))
    (folder / _OPTIMIZER_REST).write_text(json.dumps({"param_groups": optim["param_groups"], "scalars": scalars},
                                                     indent=1))


def has_training_state(folder) -> bool:
    return all((Path(folder) / n).is_file() for n in (_TRAINABLE, _OPTIMIZER, _OPTIMIZER_REST))


def load_training_state(model, optimizer, folder) -> None:
    """Every rank: the weights and optimizer state :func:`write_training_state` wrote, into the sharded model
    (``optimizer=None``: weights only). Reads only safetensors and JSON."""
    import json

    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    folder = Path(folder)
    if not has_training_state(folder):
        raise VelotuneError(f"{folder} holds no sharded-training state ({_TRAINABLE}, {_OPTIMIZER}, {_OPTIMIZER_REST}); "
                            "pass a folder written by fsdp_save_checkpoint or by SFTTrainer under FSDP")
    weights = load_file(str(folder / _TRAINABLE))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        extra, absent = sorted(set(weights) - expected)[:3], sorted(expected - set(weights))[:3]
        raise VelotuneError(f"{folder} was saved from another adapter layout (in the checkpoint only: {extra}; in "
                            f"the model only: {absent}); build the model with the same get_peft_model arguments")
    set_model_state_dict(model, weights, options=_dcp_options(strict=False))
    if optimizer is None:
        return
    rest = json.loads((folder / _OPTIMIZER_REST).read_text())
    state: dict = {}
    for flat, value in [*load_file(str(folder / _OPTIMIZER)).items(), *rest["scalars"].items()]:
        name, key = flat.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": rest["param_groups"]},
                             options=_dcp_options())


def fsdp_save_checkpoint(model, optimizer, folder, state: Optional[dict] = None) -> None:
    """Save a resumable checkpoint of an :func:`fsdp_shard`-ed model and its optimizer: the trainable
    weights (whole tensors, by parameter name) and the optimizer state in safetensors, the optimizer's
    settings and ``state`` (your own JSON-able loop state: step, scheduler, data position) in JSON, and
    the LoRA adapter in ``folder/adapter`` (what :func:`fsdp_save_adapter` writes; export from it).

    A collective: call it on every rank; the shards are gathered, rank 0 writes, atomically (a temporary
    folder renamed into place: an interrupted save leaves the previous checkpoint as it was), the others
    wait. Frozen (base, 4-bit) weights are not saved: they come from the model you load again. Nothing
    is pickled: :func:`fsdp_load_checkpoint` reads only safetensors and JSON.
    """
    import json

    d = _dist()
    if d is None:
        raise VelotuneError("fsdp_save_checkpoint is for a sharded model under torchrun; with one process use "
                            "SFTTrainer's checkpoints (save_steps) or model.save_pretrained for the adapter")
    weights, optim = gather_training_state(model, optimizer)
    if d.get_rank() == 0:
        from .export.atomic import atomic_directory

        with atomic_directory(folder) as tmp:
            write_training_state(tmp, weights, optim)
            (tmp / _STATE).write_text(json.dumps(state or {}, indent=1))
            model.save_pretrained(tmp / "adapter", state_dict=_peft_names(model, weights))
    d.barrier()


def _peft_names(model, weights: dict) -> dict:
    """Trainable weights by the names ``model.named_parameters()`` gives (what PEFT's save_pretrained takes)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = names - weights.keys()
    if missing:
        raise VelotuneError(f"checkpoint: no gathered value for {sorted(missing)[:3]}; please report this")
    return {n: weights[n] for n in names}


def fsdp_load_checkpoint(model, optimizer, folder) -> dict:
    """Resume from :func:`fsdp_save_checkpoint`: load the trainable weights and the optimizer state into an
    :func:`fsdp_shard`-ed model (each rank keeps its shards) and its optimizer (built the same way as for
    the saved run, after sharding). Returns the ``state`` dict that was saved. Call it on every rank."""
    import json

    if _dist() is None:
        raise VelotuneError("fsdp_load_checkpoint is for a sharded model under torchrun")
    folder = Path(folder)
    if not (folder / _STATE).is_file():  # the rest of the folder is checked where it is read
        raise VelotuneError(f"{folder} is not a checkpoint of fsdp_save_checkpoint (no {_STATE}); pass the folder "
                            "it wrote")
    load_training_state(model, optimizer, folder)
    return json.loads((folder / _STATE).read_text())
