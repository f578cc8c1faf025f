"""velotune.models.pointers.Slots: cached reads of a module tree's tensor addresses equal a full walk of
the tree after every kind of change a recorded graph must notice (the graphs' and decode steps' keys)."""
from __future__ import annotations

import torch

from velotune.models.pointers import Slots


def _walk(layers, grad_flags, buffers):
    """The reference: what Slots replaces, a walk of parameters() and buffers() every time."""
    out = [((p.data_ptr(), p.requires_grad) if grad_flags else p.data_ptr())
           for layer in layers for p in layer.parameters()]
    if buffers:
        out += [b.data_ptr() for layer in layers for b in layer.buffers()]
    return tuple(out)


def _layers():
    torch.manual_seed(0)
    layers = [torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
              for _ in range(3)]
    layers[1].register_buffer("table", torch.zeros(5))
    return layers


def test_slots_follow_every_change_like_a_full_walk():
    layers = _layers()
    changes = [
        lambda: setattr(layers[0][0], "weight", torch.nn.Parameter(torch.randn(4, 4))),  # a new Parameter
        lambda: setattr(layers[1][2].weight, "data", torch.randn(2, 4)),  # storage swapped under it
        lambda: layers[2][0]._parameters.__setitem__("bias", torch.nn.Parameter(torch.randn(4))),  # dict write
        lambda: layers[0][1].weight.requires_grad_(False),  # frozen
        lambda: setattr(layers[1], "table", torch.ones(5)),  # a buffer replaced
        lambda: layers[2].append(torch.nn.Linear(2, 2)),  # a submodule added
        lambda: setattr(layers[1], "1", torch.nn.LayerNorm(4)),  # a submodule replaced
        lambda: layers[2].register_buffer("extra", torch.zeros(3)),  # a buffer added
        lambda: setattr(layers[0][2], "bias", None),  # a parameter removed
    ]
    for grad_flags, buffers in ((False, False), (True, True)):
        slots = Slots(grad_flags=grad_flags, buffers=buffers)
        layers = _layers()
        seen = {slots.read(layers)}
        assert slots.read(layers) == _walk(layers, grad_flags, buffers)
        keep = []  # the replaced tensors stay alive, so a new tensor cannot land at an old one's address
        for change in changes:
            keep += [t for layer in layers for t in (*layer.parameters(), *layer.buffers())]
            change()
            got = slots.read(layers)
            assert got == _walk(layers, grad_flags, buffers)
            if not buffers and change in (changes[3], changes[4], changes[7]):
                continue  # flags and buffers are not part of an address-only parameters read
            assert got not in seen, changes.index(change)  # every change is visible in the key
            seen.add(got)
        # another list of layers (same modules, other order) is read afresh
        assert slots.read(layers[::-1]) == _walk(layers[::-1], grad_flags, buffers)


def test_slots_read_without_walking_when_nothing_was_registered(monkeypatch):
    """Between registrations the cached slots are read: the modules are not traversed again."""
    layers = _layers()
    slots = Slots(grad_flags=True, buffers=True)
    first = slots.read(layers)
    calls = []
    real = torch.nn.Module.modules
    monkeypatch.setattr(torch.nn.Module, "modules", lambda self: calls.append(1) or real(self))
    assert slots.read(layers) == first and not calls
    layers[0][0].weight = torch.nn.Parameter(torch.randn(4, 4))
    assert slots.read(layers) != first and calls


def test_parameters_of_is_parameters_after_every_change():
    """pointers.parameters_of == list(module.parameters()) (order, shared tensors once) after registrations,
    .data swaps, removals, and entries written straight into a _parameters dict (as FSDP2 does)."""
    from velotune.models.pointers import parameters_of

    layers = _layers()
    model = torch.nn.Sequential(*layers)
    model.add_module("tied", torch.nn.Linear(4, 4))
    model.tied.weight = layers[0][0].weight  # shared: listed once
    changes = [
        lambda: None,
        lambda: setattr(layers[0][0], "weight", torch.nn.Parameter(torch.randn(4, 4))),
        lambda: setattr(layers[1][2].weight, "data", torch.randn(2, 4)),
        lambda: layers[2][0]._parameters.__setitem__("bias", torch.nn.Parameter(torch.randn(4))),
        lambda: setattr(layers[0][2], "bias", None),
        lambda: layers[0][2]._parameters.__setitem__("bias", torch.nn.Parameter(torch.randn(2))),  # into a None slot
        lambda: layers[2].append(torch.nn.Linear(2, 2)),
    ]
    for change in changes:
        change()
        got, want = parameters_of(model), list(model.parameters())
        assert len(got) == len(want) and all(a is b for a, b in zip(got, want))
