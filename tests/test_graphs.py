"""The CUDA-graph path of the decoder stack (velotune/models/graphs.py), on CPU by emulation.

On CPU a "graph" re-runs the recorded function and copies its results into the same static buffers
a CUDA graph would write (graphs.EMULATE_ON_CPU), so these tests check everything but the capture:
the buffer chaining through the stack, the ping-pong of gradients, the parameter gradients handed to
autograd, gradient accumulation, the one-forward-per-backward guard, and when graphs are (not) used.
The capture itself runs in tests/test_fast_forward_gpu.py on the device.
"""
from __future__ import annotations

import pytest
import torch

from tests.tiny_models import randomize_lora_b
from velotune import FastLanguageModel, set_cuda_graphs
from velotune.models import graphs


@pytest.fixture
def emulate(monkeypatch):
    from velotune.models import offload

    monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    monkeypatch.setattr(offload, "ON_CPU", True)  # "unsloth" / "offload" take the offload paths


def _model(tiny_dir, family="llama", gc=True, **kw):
    model, tok = FastLanguageModel.from_pretrained(tiny_dir(family), max_seq_length=128, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3,
                                             use_gradient_checkpointing=gc, **kw)
    randomize_lora_b(model, seed=11, std=0.1)
    model.train()
    return model


def _ids(seed, shape=(2, 24)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 500, shape, generator=g)


def _train(model, steps, shapes=None, accumulate=1):
    """Losses and final LoRA weights of a few SGD steps (each step `accumulate` micro-batches)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for s in range(steps):
        for m in range(accumulate):
            ids = _ids(100 * s + m, (shapes or {}).get(s, (2, 24)))
            loss = model(input_ids=ids, labels=ids).loss
            (loss / accumulate).backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _captures(model):
    return graphs.state_of(model.get_base_model()).captures


@pytest.mark.parametrize("family,gc", [("llama", True), ("qwen3", True), ("llama", "unsloth"), ("qwen3", "offload"),
                                       ("llama", False), ("qwen3", "auto")])
def test_graph_path_trains_like_eager(tiny_dir, emulate, family, gc, monkeypatch):
    """gc=True: static buffer per layer input; "unsloth"/"offload": ring of three slots + host copies;
    False: layers recorded with their activations (no recompute); "auto": the planner's mix (here layer 0
    kept, layer 1 recomputed from its input in host memory)."""
    if gc == "auto":
        monkeypatch.setattr(graphs, "plan_keep", lambda policy, n, *a, **k: [i == 0 for i in range(n)])
    eager = _model(tiny_dir, family)
    set_cuda_graphs(eager, False)
    graphed = _model(tiny_dir, family, gc=gc)
    set_cuda_graphs(graphed, True)
    w0 = {n: p.detach().clone() for n, p in eager.named_parameters() if p.requires_grad}
    l_e, w_e = _train(eager, 4, accumulate=2)
    l_g, w_g = _train(graphed, 4, accumulate=2)
    assert _captures(graphed) == 1 and _captures(eager) == 0
    gs = next(iter(graphs.state_of(graphed.get_base_model()).sets.values()))
    offloaded = {"unsloth": [True, True], "offload": [True, True], "auto": [False, True]}.get(gc, [False, False])
    assert gs.offloaded == offloaded and [h is not None for h in getattr(gs, "host", [None] * 2)] == offloaded
    assert gs.keep == {False: [True, True], "auto": [True, False]}.get(gc, [False, False])
    # same ops on the same data; only autograd's summation order of a few gradients may differ
    torch.testing.assert_close(torch.tensor(l_g), torch.tensor(l_e), rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(w_e[n], w0[n]) for n in w0)  # every weight moved: a real comparison
    for n in w_e:
        torch.testing.assert_close(w_g[n], w_e[n], rtol=1e-5, atol=1e-6, msg=n)


def test_auto_records_the_first_shapes_then_stays_eager(tiny_dir, emulate, notices, monkeypatch):
    monkeypatch.setattr(graphs, "_MAX_CAPTURES", 3)
    model = _model(tiny_dir)  # default mode "auto"
    for length in (24, 16, 24, 16):
        _train(model, 1, shapes={0: (2, length)})
    st = graphs.state_of(model.get_base_model())
    assert st.captures == 2 and len(st.sets) == 2  # both shapes kept and replayed
    for length in (8, 12, 20, 24):
        _train(model, 1, shapes={0: (2, length)})
    assert st.captures == 3 and len(st.sets) == 3  # 8 recorded; 12 and 20 over the limit; 24 replayed
    assert sum("batch shapes keep changing" in m for m in notices) == 1


def test_auto_records_a_dropped_shape_again(tiny_dir, emulate, monkeypatch):
    """The "auto" limit counts distinct shapes: a shape whose set was dropped when the shared buffers grew for
    a longer batch is recorded again (counted as new, such re-recordings used up the limit, and the rest of
    a run with padding-free rows went eager); a shape never seen, past the limit, stays eager."""
    monkeypatch.setattr(graphs, "_MAX_CAPTURES", 2)
    model = _model(tiny_dir)  # max_seq_length 128, "auto"
    st = graphs.state_of(model.get_base_model())
    _train(model, 1, shapes={0: (2, 24)})
    _train(model, 1, shapes={0: (2, 200)})  # longer than max_seq_length: the arena grows, the first set goes
    assert st.arena.generation > 0 and len(st.sets) == 1 and st.captures == 2
    _train(model, 1, shapes={0: (2, 24)})
    assert st.captures == 3 and len(st.sets) == 2
    _train(model, 1, shapes={0: (2, 16)})
    assert st.captures == 3 and len(st.sets) == 2


@pytest.mark.parametrize("graphed,gc,family", [(True, "unsloth", "llama"), (False, "unsloth", "llama"),
                                               (False, True, "llama"), (True, "unsloth", "gemma2")],
                         ids=["graphs", "offload-eager", "torch-checkpoint", "gemma2-keeps-it"])
def test_recompute_skips_the_unread_down_projection(tiny_dir, emulate, monkeypatch, graphed, gc, family):
    """A recompute for backward (graphs' recorded backward; the offloaded checkpoint's eager backward; torch's
    checkpoint) runs no down projection: one _linear call fewer per recomputed layer and step, and losses and
    weights equal bit for bit those with the switch (recompute.SKIP_MLP_OUTPUT) off. Gemma-2's post-MLP norm
    reads the MLP output in its backward: there nothing is skipped."""
    from velotune.kernels import lora
    from velotune.models import recompute

    real, calls = lora._linear, []
    monkeypatch.setattr(lora, "_linear", lambda *a: calls.append(1) or real(*a))
    runs = {}
    for skip in (False, True):
        monkeypatch.setattr(recompute, "SKIP_MLP_OUTPUT", skip)
        model = _model(tiny_dir, family, gc=gc)
        set_cuda_graphs(model, "auto" if graphed else False)
        calls.clear()
        runs[skip] = _train(model, 3), len(calls), _captures(model)
    (l0, w0), n0, captures = runs[False]
    (l1, w1), n1, _ = runs[True]
    assert l0 == l1 and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert captures == int(graphed)
    layers = model.config.num_hidden_layers
    # every layer recomputed once a step, and once more at a capture (the emulation runs what it records)
    assert n0 - n1 == (0 if family == "gemma2" else (3 + captures) * layers)


def test_auto_leaves_long_batches_eager(tiny_dir, emulate, notices, monkeypatch):
    monkeypatch.setattr(graphs, "AUTO_MAX_TOKENS", 40)
    model = _model(tiny_dir)  # "auto"
    _train(model, 1, shapes={0: (2, 24)})  # 48 tokens: over the limit
    assert _captures(model) == 0 and sum("more than 40 tokens" in m for m in notices) == 1
    _train(model, 1, shapes={0: (2, 16)})  # 32 tokens: recorded
    assert _captures(model) == 1
    graphs.set_cuda_graphs(model, True)  # True records any size
    _train(model, 1, shapes={0: (2, 24)})
    assert _captures(model) == 1 and graphs.state_of(model.get_base_model()).mode is True
    assert len(graphs.state_of(model.get_base_model()).sets) == 1


@pytest.mark.parametrize("gc", [True, "unsloth"])
def test_auto_sizes_shared_buffers_only_for_batches_it_records(tiny_dir, emulate, monkeypatch, gc):
    """"auto" records batches of at most AUTO_MAX_TOKENS tokens, so its shared buffers (GPU ring, gradient
    ping-pong, page-locked host copies of offloaded layer inputs) are sized for at most that many tokens,
    not for batch x max_seq_length: a long-context run (max_seq_length 409,600) otherwise held ~16 GiB of
    GPU and ~124 GiB of page-locked host memory for its short warm-up batch's graphs, through its long
    (eager) step. Forced graphs (True) keep the batch x max_seq_length sizing."""
    monkeypatch.setattr(graphs, "AUTO_MAX_TOKENS", 100)  # under 2 x max_seq_length (256 tokens)
    for mode, tokens in (("auto", 100), (True, 2 * 128)):
        model = _model(tiny_dir, gc=gc)
        set_cuda_graphs(model, mode)
        _train(model, 1, shapes={0: (2, 24)})
        (gs,) = graphs.state_of(model.get_base_model()).sets.values()
        bufs = [gs.xs[1], gs.dbuf[0]] + ([h for h in gs.host if h is not None] if gc == "unsloth" else [])
        assert gc != "unsloth" or len(bufs) > 2  # the offloaded layers' host copies are checked too
        assert {b.untyped_storage().nbytes() for b in bufs} == {tokens * 64 * 4}  # hidden 64, fp32


def test_offload_without_host_room_stays_eager_for_that_shape(tiny_dir, emulate, notices, monkeypatch):
    """Recording the offloaded layers' host copies is checked against the machine's reserve first (page-locked
    memory cannot be swapped: the out-of-memory killer would end the run without a word). Short: that shape
    runs eager (the same numbers as without graphs), said once, and is not tried again at every step."""
    asked = []
    monkeypatch.setattr(graphs, "_host_has_room", lambda nbytes: asked.append(nbytes) and False)
    model = _model(tiny_dir, gc="unsloth")
    graphed = _train(model, 2)
    st = graphs.state_of(model.get_base_model())
    assert _captures(model) == 0 and not st.sets and st.broken is None and len(st.no_room) == 1
    # one check, at the first step: every layer's host copy, each sized for batch 2 x 128 tokens x 64, fp32
    assert asked == [model.config.num_hidden_layers * 2 * 128 * 64 * 4]
    assert sum("leave the machine less than its reserve" in m for m in notices) == 1
    eager = _model(tiny_dir, gc="unsloth")
    set_cuda_graphs(eager, False)
    l0, w0 = _train(eager, 2)
    assert graphed[0] == l0 and all(torch.equal(graphed[1][k], w0[k]) for k in w0)


def test_shapes_share_buffers_sized_for_max_seq_length(tiny_dir, emulate):
    """Every shape's static buffers are views of one arena sized for batch x max_seq_length (128 here),
    so more shapes cost no more memory; a longer batch grows it and drops what used the old memory."""
    model = _model(tiny_dir)
    set_cuda_graphs(model, True)
    st = graphs.state_of(model.get_base_model())
    for length in (24, 16):
        _train(model, 1, shapes={0: (2, length)})
    a, b = st.sets.values()
    assert a.xs[1].untyped_storage().data_ptr() == b.xs[1].untyped_storage().data_ptr()
    assert a.xs[1].untyped_storage().nbytes() == 2 * 128 * 64 * 4  # batch 2 x 128 tokens x hidden 64, fp32
    ids = _ids(0, (2, 200))  # beyond max_seq_length: the arena grows, the older sets go
    graphed = model(input_ids=ids, labels=ids).loss
    graphed.backward()
    assert len(st.sets) == 1 and st.arena.generation > 0
    set_cuda_graphs(model, False)
    torch.testing.assert_close(graphed, model(input_ids=ids, labels=ids).loss)


def test_second_forward_before_backward_raises(tiny_dir, emulate):
    model = _model(tiny_dir)
    set_cuda_graphs(model, True)
    ids = _ids(0)
    first = model(input_ids=ids, labels=ids).loss
    model(input_ids=_ids(1), labels=_ids(1)).loss.backward()  # the newest forward is fine
    with pytest.raises(RuntimeError, match="second forward ran before this backward"):
        first.backward()


def test_not_used_in_eval_or_without_grad(tiny_dir, emulate):
    model = _model(tiny_dir)
    set_cuda_graphs(model, True)
    ids = _ids(0)
    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    model.eval()
    model(input_ids=ids, labels=ids)
    assert _captures(model) == 0
    model.train()
    right_pad = torch.ones_like(ids)
    right_pad[0, -3:] = 0  # right padding in training: causal attention is exact, no mask needed
    model(input_ids=ids, attention_mask=right_pad, labels=ids).loss.backward()
    assert _captures(model) == 1
    gs = next(iter(graphs.state_of(model.get_base_model()).sets.values()))
    assert gs.inputs == {}  # nothing per call: plain causal attention, positions 0..T-1
    no_gc = _model(tiny_dir, gc=False)  # no checkpointing: graphs record the layers with their activations
    set_cuda_graphs(no_gc, True)
    no_gc(input_ids=ids, labels=ids).loss.backward()
    assert _captures(no_gc) == 1
    assert next(iter(graphs.state_of(no_gc.get_base_model()).sets.values())).keep == [True, True]


def _left_padded(seed):
    ids = _ids(seed)
    mask = torch.ones_like(ids)
    mask[0, : 3 + seed % 5] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def _packed(seed):
    g = torch.Generator().manual_seed(seed)
    cut = int(torch.randint(4, 20, (1,), generator=g))  # a different example boundary every batch
    pos = torch.cat([torch.arange(cut), torch.arange(24 - cut)]).expand(2, -1).clone()
    ids = _ids(seed)
    labels = ids.clone()
    labels[:, cut] = -100
    return dict(input_ids=ids, position_ids=pos, labels=labels)


@pytest.mark.parametrize("make", [_left_padded, _packed], ids=["left-padding-mask", "packed-rows"])
def test_batches_with_attention_inputs_train_like_eager(tiny_dir, emulate, make):
    """Masks, packed-row starts and positions change every batch: the graphs read static copies that
    are refilled every call (the second and third batch replay what the first recorded)."""
    runs = {}
    for mode in (False, True):
        model = _model(tiny_dir)
        set_cuda_graphs(model, mode)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        losses = []
        for step in range(3):
            loss = model(**make(step)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        runs[mode] = losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if mode:
            st = graphs.state_of(model.get_base_model())
            assert st.captures == 1 and next(iter(st.sets.values())).inputs  # recorded once, replayed twice
    (l_e, w_e), (l_g, w_g) = runs[False], runs[True]
    torch.testing.assert_close(torch.tensor(l_g), torch.tensor(l_e), rtol=1e-5, atol=1e-6)
    for n in w_e:
        torch.testing.assert_close(w_g[n], w_e[n], rtol=1e-5, atol=1e-6, msg=n)


def test_disabling_the_adapter_is_not_replayed_with_it(tiny_dir, emulate):
    model = _model(tiny_dir)
    set_cuda_graphs(model, True)
    ids = _ids(0)
    with_adapter = model(input_ids=ids, labels=ids).loss
    with_adapter.backward()
    with model.disable_adapter():
        without = model(input_ids=ids, labels=ids).loss
    set_cuda_graphs(model, False)
    with model.disable_adapter():
        reference = model(input_ids=ids, labels=ids).loss
    assert not torch.allclose(with_adapter, reference)
    torch.testing.assert_close(without, reference)


def test_replaced_parameters_are_recorded_again(tiny_dir, emulate):
    model = _model(tiny_dir)
    set_cuda_graphs(model, True)
    ids = _ids(0)
    model(input_ids=ids, labels=ids).loss.backward()
    lora_b = next(m for n, m in model.named_modules() if n.endswith("q_proj.lora_B.default"))
    lora_b.weight = torch.nn.Parameter(torch.randn_like(lora_b.weight))  # a new tensor, new storage
    loss = model(input_ids=ids, labels=ids).loss
    assert _captures(model) == 2
    set_cuda_graphs(model, False)
    torch.testing.assert_close(loss, model(input_ids=ids, labels=ids).loss)


def test_set_cuda_graphs_rejects_unknown_mode(tiny_dir):
    model = _model(tiny_dir)
    with pytest.raises(ValueError, match="use 'auto', True or False"):
        set_cuda_graphs(model, "always")


def test_a_copied_model_records_its_own_graphs(tiny_dir, emulate):
    import copy

    model = _model(tiny_dir)
    set_cuda_graphs(model, True)
    ids = _ids(0)
    model(input_ids=ids, labels=ids).loss.backward()
    twin = copy.deepcopy(model)
    assert _captures(twin) == 0 and graphs.state_of(twin.get_base_model()).mode is True
    loss = twin(input_ids=ids, labels=ids).loss
    assert _captures(twin) == 1
    set_cuda_graphs(model, False)
    torch.testing.assert_close(loss, model(input_ids=ids, labels=ids).loss)


def test_offloaded_checkpointing_without_graphs_trains_like_recompute(tiny_dir, monkeypatch):
    """The eager offload Function (models/offload.py): layer input to "host", recompute in backward."""
    from velotune.models import offload

    monkeypatch.setattr(offload, "ON_CPU", True)
    calls = []
    real = offload.OffloadedCheckpoint.forward
    monkeypatch.setattr(offload.OffloadedCheckpoint, "forward",  # a: run_layer, layer, ahead, x, *params
                        staticmethod(lambda ctx, *a: calls.append(a[2]) or real(ctx, *a)))
    plain = _model(tiny_dir)
    set_cuda_graphs(plain, False)
    offloaded = _model(tiny_dir, gc="unsloth")
    set_cuda_graphs(offloaded, False)
    l_p, w_p = _train(plain, 3, accumulate=2)
    l_o, w_o = _train(offloaded, 3, accumulate=2)
    # steps x micro-batches x layers: every layer took the offload path; all but the last of each forward
    # with another offloaded layer ahead (whose host buffer is page-locked meanwhile: PinnedPool.prefetch)
    assert calls == [True, False] * (3 * 2)
    torch.testing.assert_close(torch.tensor(l_o), torch.tensor(l_p), rtol=1e-5, atol=1e-6)
    for n in w_p:
        torch.testing.assert_close(w_o[n], w_p[n], rtol=1e-5, atol=1e-6, msg=n)


def test_memory_planner_keeps_what_fits():
    gib = 2**30
    # 80 GiB card, 70 free, 1 GiB per layer: 70 - max(8, 2) reserve - 2 temporaries = 60 layers of 32 -> all
    assert graphs.plan_keep("auto", 32, gib, None, (70 * gib, 80 * gib)) == [True] * 32
    # 20 free: 20 - 8 - 2 = 10 layers kept, the first ten
    assert graphs.plan_keep("auto", 32, gib, None, (20 * gib, 80 * gib)) == [i < 10 for i in range(32)]
    # a budget: 0.25 of the card = 20 GiB (free is more) -> 18; in bytes: 6 GiB -> 4; never below 0
    assert sum(graphs.plan_keep("auto", 32, gib, 0.25, (70 * gib, 80 * gib))) == 18
    assert sum(graphs.plan_keep("auto", 32, gib, 6 * gib, (70 * gib, 80 * gib))) == 4
    assert graphs.plan_keep("auto", 32, gib, None, (5 * gib, 80 * gib)) == [False] * 32
    # a budget is the process's whole memory: beside 4 GiB already in use, 12 GiB leave 8 - 2 = 6 layers; a
    # budget below what is in use keeps none; the default (no budget) ignores what is in use
    assert sum(graphs.plan_keep("auto", 32, gib, 12 * gib, (70 * gib, 80 * gib), in_use=4 * gib)) == 6
    assert sum(graphs.plan_keep("auto", 32, gib, 0.25, (70 * gib, 80 * gib), in_use=4 * gib)) == 14
    assert sum(graphs.plan_keep("auto", 32, gib, 3 * gib, (70 * gib, 80 * gib), in_use=4 * gib)) == 0
    assert sum(graphs.plan_keep("auto", 32, gib, None, (20 * gib, 80 * gib), in_use=4 * gib)) == 10
    # the other policies, and no measurement (CPU): nothing to plan
    assert graphs.plan_keep("keep", 3, None) == [True] * 3
    assert graphs.plan_keep("recompute", 3, gib, None, (70 * gib, 80 * gib)) == [False] * 3
    assert graphs.plan_keep("auto", 3, None, None, None) == [False] * 3


def test_pool_reservation_scales_the_warm_ups_temporaries():
    """The pool is sized for the longest batch expected from a warm-up at a shorter one: the temporaries (what
    the warm-up cut minus what it still held) scale with the tokens, the held part (cuBLAS' workspaces) does
    not; a batch already the longest (or none expected) gets what its warm-up cut; no temporaries, nothing."""
    mib = 2**20
    # bs 2 x 1280 warm-up cut 394 MiB, 64 of them held at its end: 330 MiB of temporaries -> 2 x 2048: 528 + 64
    assert graphs.reservation_bytes(394 * mib, 64 * mib, 2560, 4096) == 528 * mib + 64 * mib
    assert graphs.reservation_bytes(394 * mib, 64 * mib, 4096, 4096) == 394 * mib
    assert graphs.reservation_bytes(394 * mib, 64 * mib, 4096, 2560) == 394 * mib
    assert graphs.reservation_bytes(394 * mib, 64 * mib, 4096, 0) == 394 * mib
    assert graphs.reservation_bytes(64 * mib, 64 * mib, 1024, 4096) == 0


def test_pool_is_sized_only_before_its_first_capture(tiny_dir, emulate):
    """The sizing hook is offered once per pool: a pool that already holds a capture's segments is too late to
    size (a reservation there would add to them), and emulation (no pool) offers none."""
    model = _model(tiny_dir, "llama", True)
    st = graphs.state_of(model.get_base_model())
    assert graphs._reserver(st, 512, 4096) is None  # no pool (CPU): nothing to size
    st.pool = object()
    assert graphs._reserver(st, 512, 4096) is not None
    assert graphs._reserver(st, 512, 0) is not None  # no longest batch known: sized for this one's
    assert graphs._reserver(st, 512, 4096, "auto") is None  # "keep" / "auto": the pool holds activations per set
    st.pool = None
    _train(model, 1)
    assert st.captures == 1 and st.reserved == (None, 0, False)  # recorded: the pool is no longer new
    assert graphs._reserver(st, 512, 4096) is None


@pytest.mark.parametrize("fixed_shape_sized", [True, False])
def test_pool_sizing_by_what_is_expected(tiny_dir, monkeypatch, fixed_shape_sized):
    """The first capture's sizing: a longer batch expected gets the scaled reservation; one already the longest
    gets its own warm-up's cut, or (SIZE_FIXED_SHAPE_POOL off) nothing; later warm-ups run in the pool either way."""
    mib = 2**20
    taken = []
    monkeypatch.setattr(graphs, "_reserve_pool", lambda pool, nbytes, stream: taken.append(nbytes) or "graph")
    monkeypatch.setattr(graphs, "SIZE_FIXED_SHAPE_POOL", fixed_shape_sized)
    st = graphs.state_of(_model(tiny_dir).get_base_model())
    for tokens, expect in ((2560, 4096), (4096, 4096), (4096, 0)):
        st.pool, st.reserved, taken[:] = object(), None, []
        graphs._reserver(st, tokens, expect)(394 * mib, 64 * mib)
        want = graphs.reservation_bytes(394 * mib, 64 * mib, tokens, expect)
        if expect > tokens or fixed_shape_sized:
            assert taken == [want] and st.reserved == ("graph", want, True)
        else:
            assert taken == [] and st.reserved == (None, 0, True)


def test_loss_scratch_only_in_a_pool_its_warm_ups_use(tiny_dir, monkeypatch):
    """The loss's temporaries go to the graphs' pool only where no block of it is read from one replay to the
    next: a pool whose warm-ups run in it (recompute / offload, st.reserved[2]), with the routing available and
    LOSS_IN_POOL on; otherwise (no pool yet, "keep" / "auto", an unsized pool recorded before) where the caller is."""
    base = _model(tiny_dir).get_base_model()
    assert graphs.loss_scratch(base) is None  # nothing recorded yet
    st = graphs.state_of(base)
    monkeypatch.setattr(graphs, "_can_route", lambda: True)
    st.pool, st.stream, st.replayed = (0, 7), "the captures' stream", True
    for reserved, used in ((None, False), ((None, 0, False), False), (("graph", 5, True), True), ((None, 0, True), True)):
        st.reserved = reserved
        assert (graphs.loss_scratch(base) is not None) == used, reserved
    monkeypatch.setattr(graphs, "LOSS_IN_POOL", False)
    assert graphs.loss_scratch(base) is None
    monkeypatch.setattr(graphs, "LOSS_IN_POOL", True)
    st.replayed = False  # this forward's stack ran eagerly: its loss's temporaries would grow the pool for good
    assert graphs.loss_scratch(base) is None
    st.replayed = True
    monkeypatch.setattr(graphs, "_can_route", lambda: False)
    assert graphs.loss_scratch(base) is None


def test_replayed_says_whether_this_forward_ran_through_graphs(tiny_dir, emulate, monkeypatch):
    """st.replayed (what loss_scratch asks) is set by a forward whose stack replays graphs and cleared by the next
    one that runs eagerly: a batch past AUTO_MAX_TOKENS, a forward without gradients, graphs switched off."""
    model = _model(tiny_dir)
    st = graphs.state_of(model.get_base_model())
    ids = _ids(1, (2, 24))
    model(input_ids=ids, labels=ids).loss.backward()
    assert st.replayed and st.captures == 1
    monkeypatch.setattr(graphs, "AUTO_MAX_TOKENS", 50)
    longer = _ids(2, (2, 32))
    model(input_ids=longer, labels=longer).loss.backward()  # a new shape of 64 tokens: eager in "auto"
    assert not st.replayed and st.captures == 1
    monkeypatch.setattr(graphs, "AUTO_MAX_TOKENS", 65536)
    model(input_ids=ids, labels=ids).loss.backward()
    assert st.replayed
    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    assert not st.replayed
    model(input_ids=ids, labels=ids).loss.backward()
    assert st.replayed
    set_cuda_graphs(model, False)
    model(input_ids=ids, labels=ids).loss.backward()
    assert not graphs.state_of(model.get_base_model()).replayed


def test_warm_up_routing_gives_the_pool_back_its_count(monkeypatch):
    """The warm-up's routing into the graphs' pool begins, ends and releases (begin counts one more user of the
    pool: unbalanced, a dropped pool would never be freed), in that order, also when the warm-up raises."""
    calls = []
    for name in graphs._ROUTING:
        monkeypatch.setattr(torch._C, name, lambda *a, name=name: calls.append((name, a)), raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(RuntimeError, match="mid-warm-up"):
        with graphs._allocating_in((0, 7)):
            assert [c[0] for c in calls] == ["_cuda_beginAllocateToPool"]
            raise RuntimeError("mid-warm-up")
    assert calls == [(name, (0, (0, 7))) for name in graphs._ROUTING]
    assert graphs._can_route()


def test_set_memory_budget(tiny_dir):
    from velotune import set_memory_budget

    model = _model(tiny_dir)
    set_memory_budget(model, 12.5)
    assert graphs.state_of(model.get_base_model()).memory_budget == int(12.5 * 2**30)
    set_memory_budget(model, 0.5)
    assert graphs.state_of(model.get_base_model()).memory_budget == 0.5
    set_memory_budget(model, 40)
    assert graphs.state_of(model.get_base_model()).memory_budget == 40 * 2**30
    with pytest.raises(ValueError, match="give GiB"):
        set_memory_budget(model, -1)


def test_get_peft_model_takes_the_memory_budget(tiny_dir):
    """Issue #4's spelling: get_peft_model(use_gradient_checkpointing="auto", memory_budget=...) sets what
    set_memory_budget sets; a budget without "auto", or one that is no amount, is refused naming the fix."""
    from velotune import VelotuneError

    model = _model(tiny_dir, gc="auto", memory_budget=24)
    assert graphs.state_of(model.get_base_model()).memory_budget == 24 * 2**30
    model = _model(tiny_dir, gc="auto", memory_budget=0.75)
    assert graphs.state_of(model.get_base_model()).memory_budget == 0.75
    assert graphs.state_of(_model(tiny_dir, gc="auto").get_base_model()).memory_budget is None
    with pytest.raises(VelotuneError, match="pass use_gradient_checkpointing='auto'"):
        _model(tiny_dir, gc="unsloth", memory_budget=24)
    for bad in (-2, True, "40G"):
        with pytest.raises(VelotuneError, match="give GiB"):
            _model(tiny_dir, gc="auto", memory_budget=bad)


def test_frozen_weights_moved_are_recorded_again(tiny_dir, emulate):
    """A graph reads frozen weights by address too: storage that moved (e.g. .to(device) and back)
    must not be replayed from the old address."""
    model = _model(tiny_dir)
    set_cuda_graphs(model, True)
    ids = _ids(0)
    model(input_ids=ids, labels=ids).loss.backward()
    base = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj")).base_layer
    with torch.no_grad():
        base.weight.data = base.weight.data.clone() * 2  # new storage, new values
    loss = model(input_ids=ids, labels=ids).loss
    assert _captures(model) == 2
    set_cuda_graphs(model, False)
    torch.testing.assert_close(loss, model(input_ids=ids, labels=ids).loss)


def test_a_forward_of_another_shape_before_backward_raises(tiny_dir, emulate):
    """Every shape's graphs share the arena's buffers: a forward of any shape overwrites them."""
    model = _model(tiny_dir)
    set_cuda_graphs(model, True)
    first = model(input_ids=_ids(0, (2, 24)), labels=_ids(0, (2, 24))).loss
    model(input_ids=_ids(1, (2, 16)), labels=_ids(1, (2, 16))).loss.backward()
    assert _captures(model) == 2
    with pytest.raises(RuntimeError, match="second forward ran before this backward"):
        first.backward()


def test_failed_capture_releases_buffers_and_trains_eagerly(tiny_dir, emulate, monkeypatch):
    """A capture that fails is said, the graphs' sets / shared buffers / pool are given back (they stayed
    reserved, 18 GiB on the 8B step under DDP), and the run goes on eagerly with eager's numbers."""
    eager = _model(tiny_dir)
    set_cuda_graphs(eager, False)
    graphed = _model(tiny_dir)
    set_cuda_graphs(graphed, True)
    st = graphs.state_of(graphed.get_base_model())
    _train(eager, 1)
    _train(graphed, 1)  # a first shape records fine: its buffers live in the arena
    assert st.captures == 1 and st.arena.flat

    def fail(self, *a, **k):
        raise RuntimeError("capture invalidated (test)")

    monkeypatch.setattr(graphs.GraphSet, "__init__", fail)
    ids = _ids(5, (2, 20))  # a new shape: a new capture, which fails
    loss_g = graphed(input_ids=ids, labels=ids).loss
    assert st.broken and "capture invalidated" in st.broken
    assert not st.sets and not st.arena.flat and st.pool is None
    loss_g.backward()
    loss_e = eager(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_g, loss_e, rtol=1e-5, atol=1e-6)
    assert _captures(graphed) == 1



@pytest.mark.parametrize("gc", [True, "unsloth", False])
def test_graph_path_with_parameter_views_trains_like_eager(tiny_dir, emulate, gc, monkeypatch):
    """Recorded backwards that differentiate views of the parameters (graphs.PARAM_VIEWS: under DDP the
    parameters' own AccumulateGrad nodes broke the capture): eager's losses and weights, the real
    parameters back in their modules after every capture and replay."""
    monkeypatch.setattr(graphs, "PARAM_VIEWS", True)
    eager = _model(tiny_dir)
    set_cuda_graphs(eager, False)
    graphed = _model(tiny_dir, gc=gc)
    set_cuda_graphs(graphed, True)
    l_e, w_e = _train(eager, 3, accumulate=2)
    l_g, w_g = _train(graphed, 3, accumulate=2)
    gs = next(iter(graphs.state_of(graphed.get_base_model()).sets.values()))
    assert _captures(graphed) == 1 and gs.param_views
    assert all(type(p) is torch.nn.Parameter for p in graphed.parameters())
    torch.testing.assert_close(torch.tensor(l_g), torch.tensor(l_e), rtol=1e-5, atol=1e-6)
    for n in w_e:
        torch.testing.assert_close(w_g[n], w_e[n], rtol=1e-4, atol=1e-6)


def test_parameter_views_switch(monkeypatch):
    """PARAM_VIEWS: True (the default) views everywhere; None views in a process of a torch.distributed group
    (DDP), the parameters elsewhere; False the parameters."""
    import torch.distributed as dist

    assert graphs.PARAM_VIEWS is True and graphs._param_views()
    monkeypatch.setattr(graphs, "PARAM_VIEWS", None)
    assert not graphs._param_views()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    assert graphs._param_views()
    monkeypatch.setattr(graphs, "PARAM_VIEWS", False)
    assert not graphs._param_views()


def test_auto_with_memory_left_holds_the_4bit_weights_dequantised(tiny_dir, emulate, monkeypatch):
    """"auto", every layer kept and memory left (graphs.RESIDENT_*): the frozen 4-bit weights are dequantised
    once and held, the recorded steps read them (no dequantisation per step) and train exactly like the same
    graphs without them (the same values); set_cuda_graphs releases them. Without enough spare memory they
    are not held."""
    from velotune.quant.nf4 import NF4Weight

    monkeypatch.setattr(graphs, "RESIDENT_ON_CPU", True)
    monkeypatch.setattr(graphs, "plan_keep", lambda policy, n, *a, **k: [True] * n)

    def model_4bit():
        m, _ = FastLanguageModel.from_pretrained(tiny_dir("llama"), max_seq_length=128, load_in_4bit=True)
        m = FastLanguageModel.get_peft_model(m, r=8, lora_alpha=16, random_state=3, use_gradient_checkpointing="auto")
        randomize_lora_b(m, seed=11, std=0.1)
        set_cuda_graphs(m, True)
        return m.train()

    calls = []
    real = NF4Weight.dequantize
    monkeypatch.setattr(NF4Weight, "dequantize", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    runs = {}
    for spare in (0, 1 << 40):
        monkeypatch.setattr(graphs, "plan_spare", lambda *a, spare=spare, **k: spare)
        model = model_4bit()
        _train(model, 1)  # captures (and holds the weights when they fit)
        st = graphs.state_of(model.get_base_model())
        assert bool(st.resident) == bool(spare) and all(b.resident is not None for b in st.resident)
        calls.clear()
        runs[spare] = _train(model, 2)
        assert (len(calls) == 0) == bool(spare), len(calls)  # held: replays never dequantise
        if spare:
            held = list(st.resident)
            set_cuda_graphs(model, False)
            assert all(b.resident is None for b in held)
    (l0, w0), (l1, w1) = runs[0], runs[1 << 40]
    assert l0 == l1
    for n in w0:
        assert torch.equal(w0[n], w1[n]), n


def test_plan_spare_counts_what_the_kept_layers_leave():
    gib = 1 << 30
    keep = [True, True, False]
    assert graphs.plan_spare("auto", keep, gib, budget=10 * gib, mem_info=(40 * gib, 80 * gib)) == 10 * gib - 4 * gib
    assert graphs.plan_spare("auto", keep, gib, budget=0.25, mem_info=(40 * gib, 80 * gib)) == 20 * gib - 4 * gib
    # no budget: the free memory minus 10% of the card and two layers of temporaries
    assert graphs.plan_spare("auto", keep, gib, mem_info=(40 * gib, 80 * gib)) == int(40 * gib - 8 * gib) - 4 * gib
    assert graphs.plan_spare("auto", [True] * 30, gib, budget=10 * gib, mem_info=(40 * gib, 80 * gib)) == 0
    assert graphs.plan_spare("recompute", keep, gib, mem_info=(40 * gib, 80 * gib)) == 0


def test_pending_grad_bytes_counts_gradients_still_to_come():
    """What the first recorded step has yet to allocate for gradients, counted inside an "auto" budget: the
    graphs' buffer of each trainable parameter (unless the arena holds it from another batch shape) and
    its .grad (unless there)."""
    a, b = torch.nn.Parameter(torch.zeros(3, 5)), torch.nn.Parameter(torch.zeros(7, dtype=torch.bfloat16))
    c = torch.nn.Parameter(torch.zeros(2))
    params = [[a, b], [c]]
    arena = graphs._Arena()
    nbytes = 15 * 4 + 7 * 2 + 2 * 4
    assert graphs._pending_grad_bytes(params, arena) == 2 * nbytes
    arena.view(("g", 1), b.shape, b.dtype, b.device)  # the buffer of b, from an earlier batch shape
    arena.view(("g", 2), (1,), c.dtype, c.device)  # too small for c: grows at capture, so still counted
    assert graphs._pending_grad_bytes(params, arena) == 2 * nbytes - 7 * 2
    a.grad = torch.zeros_like(a)
    assert graphs._pending_grad_bytes(params, arena) == 2 * nbytes - 7 * 2 - 15 * 4


def test_budget_below_the_no_keep_step_is_said(notices):
    """An explicit budget the step cannot keep even with no layer keeping activations: said once, with the
    amount and the fix; a budget that covers it, or a fraction of the card that does, says nothing."""
    gib = 1 << 30
    graphs._say_if_short(7 * gib, 80 * gib, int(7.5 * gib))
    graphs._say_if_short(7 * gib, 80 * gib, int(7.5 * gib))
    assert len(notices) == 1
    assert "budget of 7.00 GiB" in notices[0] and "~7.50 GiB" in notices[0] and "raise memory_budget" in notices[0]
    graphs._say_if_short(8 * gib, 80 * gib, int(7.5 * gib))
    graphs._say_if_short(0.1, 80 * gib, int(7.5 * gib))  # 8 GiB of the card
    assert len(notices) == 1
    graphs._say_if_short(0.05, 80 * gib, int(7.5 * gib))  # 4 GiB
    assert len(notices) == 2 and "budget of 4.00 GiB" in notices[1]


@pytest.mark.parametrize("gc", [True, "unsloth"])
def test_graphed_steps_register_nothing(tiny_dir, emulate, gc):
    """A graphed training step registers no module, parameter or buffer anywhere (a ModuleList slice of the
    layers did, 32 modules a step at 8B): the cached address slots of the graphs' key (models/pointers.py)
    are then read, not rebuilt, every step."""
    from velotune.models import pointers

    model = _model(tiny_dir, gc=gc)
    set_cuda_graphs(model, True)
    _train(model, 2)
    before = pointers._registrations
    _train(model, 2)
    assert pointers._registrations == before and _captures(model) == 1


def _deep_model(tmp_path, layers: int, gc):
    """A tiny Llama with ``layers`` decoder layers (enough for the ring of offloaded inputs to wrap around)."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import make_config, make_tokenizer

    folder = tmp_path / f"llama-{layers}"
    if not (folder / "config.json").is_file():
        tok = make_tokenizer()
        cfg = make_config("llama", len(tok))
        cfg.num_hidden_layers = layers
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)
    model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=128, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3, use_gradient_checkpointing=gc)
    randomize_lora_b(model, seed=11, std=0.1)
    return model.train()


@pytest.mark.parametrize("kept", [0, 2, 5, 7])
def test_auto_keeps_a_prefix_and_offloads_the_rest(tmp_path, emulate, monkeypatch, kept):
    """"auto" with offloading available: the first ``kept`` of 7 layers keep their activations, the others'
    inputs wait in host memory through the ring of three GPU slots (wrapping around twice) and are fetched
    one layer ahead in backward: eager's losses and weights (a slot reused too early would feed a layer the
    wrong input). The pure "offload" policy over the same 7 layers too."""
    real = graphs.plan_keep
    monkeypatch.setattr(graphs, "plan_keep", lambda policy, n, *a, **k: [i < kept for i in range(n)]
                        if policy == "auto" else real(policy, n, *a, **k))
    eager = _deep_model(tmp_path, 7, True)
    set_cuda_graphs(eager, False)
    l_e, w_e = _train(eager, 3, accumulate=2)
    for gc in ("auto", "offload"):
        graphed = _deep_model(tmp_path, 7, gc)
        set_cuda_graphs(graphed, True)
        l_g, w_g = _train(graphed, 3, accumulate=2)
        assert graphs.state_of(graphed.get_base_model()).broken is None, graphs.state_of(graphed.get_base_model()).broken
        gs = next(iter(graphs.state_of(graphed.get_base_model()).sets.values()))
        want = [i >= kept for i in range(7)] if gc == "auto" else [True] * 7
        assert gs.offloaded == want and gs.keep == ([i < kept for i in range(7)] if gc == "auto" else [False] * 7)
        ring = {x.data_ptr() for x, off in zip(gs.xs, want + want[-1:]) if off}  # inputs and output in the ring
        assert len(ring) == (min(3, sum(want) + 1) if any(want) else 0)
        assert not ring & {x.data_ptr() for x, off in zip(gs.xs, want + want[-1:]) if not off}
        torch.testing.assert_close(torch.tensor(l_g), torch.tensor(l_e), rtol=1e-5, atol=1e-6)
        for n in w_e:
            torch.testing.assert_close(w_g[n], w_e[n], rtol=1e-5, atol=1e-6, msg=(gc, n))


def test_plan_keep_counts_input_buffers():
    """The planner counts the layer-input buffers it makes: one per layer (and the output, and two gradient
    buffers) when nothing is offloaded; with the rest offloaded, one per kept layer plus the ring."""
    gib, mib = 2**30, 2**20
    mem = (20 * gib, 80 * gib)  # 20 free: 20 - 8 reserve - 2 temporaries = 10 GiB usable
    assert sum(graphs.plan_keep("auto", 32, gib, None, mem)) == 10
    assert sum(graphs.plan_keep("auto", 32, gib, None, mem, input_bytes=64 * mib)) == 7  # 10 - 35 x 64 MiB = 7.8
    # offloaded rest: each kept layer 1 GiB + 64 MiB, plus 5 x 64 MiB of ring and gradients: 9.1 // 1.0625 = 9
    assert sum(graphs.plan_keep("auto", 32, gib, None, mem, input_bytes=64 * mib, offload_rest=True)) == 9
    keep = [i < 9 for i in range(32)]
    assert graphs.plan_spare("auto", keep, gib, None, mem, 64 * mib, True) == int(10 * gib - 9 * gib - 14 * 64 * mib)
