"""The 1F1B and forward-only schedules themselves (``parallel/pipeline.py``), on a toy fp64 model with plain
autograd: every stage two ``tanh(Linear(8, 8))`` layers of a student, plus a frozen teacher whose hidden states
travel in the same message without a gradient (as when distilling). At PP=2 and PP=4 with 1, 3 and 8
micro-batches the stages' accumulated gradients equal one process running all the layers, the events of each
stage follow Megatron's order (warm-up forwards, 1F1B, cool-down backwards), at most ``min(PP - stage, m)``
micro-batches are in flight, and a micro-batch's graph is gone once its backward ran.

The interleaved schedule (2 model chunks a stage, one toy layer each: chunk ``c`` of stage ``r`` is virtual
stage ``c * PP + r``) gives the same gradients and forward-only outputs, runs ``interleaved_order``, and that
order idles exactly (PP - 1) / (chunks * m + PP - 1) when every chunk costs the same. A ``GPTModel`` stage of
two model chunks, run chunk by chunk, gives the whole model's logits.

One group of processes per PP runs every case (spawning is the slow part).
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from tests.distributed import run_distributed
from tests.tiny_models import tiny

WIDTH, MICRO_BATCH, LAYERS_PER_STAGE = 8, 2, 2
MICROBATCHES = (1, 3, 8)
CHUNKS = LAYERS_PER_STAGE  # interleaved: one toy layer per model chunk


def _toy(pp: int):
    """The whole model and data, the same on every process: student layers, frozen teacher layers,
    micro-batches ``[m, MICRO_BATCH, WIDTH]`` and their targets."""
    g = torch.Generator().manual_seed(1234)

    def linear(trainable: bool) -> nn.Linear:
        layer = nn.Linear(WIDTH, WIDTH, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(WIDTH, WIDTH, generator=g, dtype=torch.float64) / WIDTH**0.5)
            layer.bias.copy_(torch.randn(WIDTH, generator=g, dtype=torch.float64) * 0.1)
        return layer.requires_grad_(trainable)

    n = pp * LAYERS_PER_STAGE
    student = [linear(True) for _ in range(n)]
    teacher = [linear(False) for _ in range(n)]
    m = max(MICROBATCHES)
    data = torch.randn(m, MICRO_BATCH, WIDTH, generator=g, dtype=torch.float64)
    targets = torch.randn(m, MICRO_BATCH, WIDTH, generator=g, dtype=torch.float64)
    return student, teacher, data, targets


def _run(layers, x):
    for layer in layers:
        x = torch.tanh(layer(x))
    return x


def _loss(s, t, target):
    return ((s - target) ** 2).sum() + 0.1 * (s * t).sum()


def _stage(rank: int, pp: int):
    """This process's pipeline stage over the toy model, every m: see ``_case`` and ``_interleaved_case``."""
    student, teacher, data, targets = _toy(pp)
    held = slice(rank * LAYERS_PER_STAGE, (rank + 1) * LAYERS_PER_STAGE)
    cases = {m: _case(rank, pp, m, student[held], teacher[held], data, targets) for m in MICROBATCHES}
    cases["interleaved"] = {m: _interleaved_case(rank, pp, m, student, teacher, data, targets) for m in (pp, 2 * pp)}
    return cases


def _interleaved_case(rank, pp, m, student, teacher, data, targets) -> dict:
    """One interleaved run over ``CHUNKS`` chunks of one layer each (chunk c: layer ``c * pp + rank``)."""
    from megatron_subnet.parallel.pipeline_executor import Messages, forward_backward, forward_only

    layers = [rank + c * pp for c in range(CHUNKS)]
    for i in layers:
        student[i].zero_grad(set_to_none=True)
    messages = Messages([((MICRO_BATCH, WIDTH), torch.float64)] * 2, with_grad=1)
    events: list[tuple[str, int, int]] = []

    def forward(chunk, i, received):
        events.append(("F", chunk, i))
        s_in, t_in = (data[i], data[i]) if rank == 0 and chunk == 0 else received
        layer = layers[chunk]
        with torch.no_grad():
            t = _run([teacher[layer]], t_in)
        s = _run([student[layer]], s_in)
        return _loss(s, t, targets[i]) if layer == CHUNKS * pp - 1 else [s, t]

    def backward(chunk, i, scalar):
        events.append(("B", chunk, i))
        scalar.backward()

    trace: list = []
    peak = forward_backward(m, CHUNKS, forward, backward, messages, trace=trace)
    grads = {i: [p.grad.clone() for p in student[i].parameters()] for i in layers}

    outputs = []

    @torch.no_grad()
    def evaluate(chunk, i, received):
        s_in, t_in = (data[i], data[i]) if rank == 0 and chunk == 0 else received
        layer = layers[chunk]
        s, t = _run([student[layer]], s_in), _run([teacher[layer]], t_in)
        if layer == CHUNKS * pp - 1:
            outputs.append((s.clone(), t.clone()))
        return [s, t]

    forward_only(m, CHUNKS, evaluate, messages)
    return {"grads": grads, "events": events, "peak": peak, "forward_only": outputs, "trace": trace}


def _case(rank, pp, m, mine, mine_teacher, data, targets) -> dict:
    """One 1F1B run (gradients, events, peak, what was still alive at each backward and after) and one
    forward-only run (the last stage's outputs) of ``m`` micro-batches on this stage's layers."""
    from megatron_subnet.parallel.pipeline_executor import Messages, forward_backward, forward_only

    params = [p for layer in mine for p in layer.parameters()]
    for p in params:
        p.grad = None
    first, last = rank == 0, rank == pp - 1
    messages = Messages([((MICRO_BATCH, WIDTH), torch.float64)] * 2, with_grad=1)
    events: list[str] = []
    refs: dict[int, weakref.ref] = {}
    alive_at_backward: dict[int, list[int]] = {}
    received_grad_flags: list[tuple[bool, bool]] = []
    output_grad_shapes: dict[int, tuple] = {}

    def forward(_chunk, i, received):
        events.append(f"F {i}")
        if first:
            s_in, t_in = data[i], data[i]
        else:
            s_in, t_in = received
            received_grad_flags.append((s_in.requires_grad, t_in.requires_grad))
        with torch.no_grad():
            t = _run(mine_teacher, t_in)
        s = _run(mine, s_in)
        s.register_hook(lambda g: output_grad_shapes.__setitem__(i, tuple(g.shape)))
        result = _loss(s, t, targets[i]) if last else [s, t]
        refs[i] = weakref.ref(result if last else s)  # holds the micro-batch's graph until its backward
        return result

    def backward(_chunk, i, scalar):
        events.append(f"B {i}")
        alive_at_backward[i] = sorted(k for k, r in refs.items() if r() is not None)
        assert scalar.shape == () and (scalar is refs[i]() if last else scalar.item() == 0.0)
        scalar.backward()
        # off the last stage the stand-in hands the stage's output the gradient the next stage sent back
        assert output_grad_shapes.pop(i) == (MICRO_BATCH, WIDTH)

    trace: list = []
    peak = forward_backward(m, 1, forward, backward, messages, trace=trace)
    alive_after = sorted(k for k, r in refs.items() if r() is not None)

    outputs = []

    @torch.no_grad()
    def evaluate(_chunk, i, received):
        s_in, t_in = (data[i], data[i]) if first else received
        s, t = _run(mine, s_in), _run(mine_teacher, t_in)
        if last:
            outputs.append((s.clone(), t.clone()))
        return [s, t]

    forward_only(m, 1, evaluate, messages)
    return {
        "trace": trace,
        "grads": [p.grad.clone() for p in params],
        "events": events,
        "peak": peak,
        "alive_at_backward": alive_at_backward,
        "alive_after": alive_after,
        "received_grad_flags": received_grad_flags,
        "forward_only": outputs,
    }


def _reference(pp: int, m: int):
    """One process, all the layers, the same micro-batches: accumulated gradients per layer and the outputs."""
    student, teacher, data, targets = _toy(pp)
    outputs = []
    for i in range(m):
        with torch.no_grad():
            t = _run(teacher, data[i])
        s = _run(student, data[i])
        _loss(s, t, targets[i]).backward()
        outputs.append((s.detach(), t))
    grads = [p.grad for layer in student for p in layer.parameters()]
    return grads, outputs


def _expected_events(pp: int, rank: int, m: int) -> list[str]:
    warmup = min(pp - rank - 1, m)
    steady = m - warmup
    events = [f"F {i}" for i in range(warmup)]
    for k in range(steady):
        events += [f"F {warmup + k}", f"B {k}"]
    return events + [f"B {i}" for i in range(steady, m)]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda pp: f"pp{pp}")
def pipeline(request):
    pp = request.param
    return pp, run_distributed(_stage, pp, pipeline_parallel=pp, args=(pp,), timeout=120)


@pytest.mark.parametrize("m", MICROBATCHES)
def test_1f1b_gradients_equal_one_process(pipeline, m):
    pp, stages = pipeline
    want, _ = _reference(pp, m)
    per_stage = 2 * LAYERS_PER_STAGE  # weight and bias of each layer
    for rank, stage in enumerate(stages):
        got = stage[m]["grads"]
        for g, w in zip(got, want[rank * per_stage : (rank + 1) * per_stage], strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("m", MICROBATCHES)
def test_1f1b_event_order_and_peak_in_flight(pipeline, m):
    pp, stages = pipeline
    for rank, stage in enumerate(stages):
        events = stage[m]["events"]
        assert events == _expected_events(pp, rank, m), f"stage {rank}"
        # in flight after each event never exceeds PP; the returned peak is Megatron's min(PP - stage, m)
        running, most = 0, 0
        for e in events:
            running += 1 if e.startswith("F") else -1
            most = max(most, running)
        assert running == 0
        assert stage[m]["peak"] == most == min(pp - rank, m) <= pp, f"stage {rank}"


@pytest.mark.parametrize("m", MICROBATCHES)
def test_1f1b_releases_a_micro_batch_after_its_backward(pipeline, m):
    pp, stages = pipeline
    for rank, stage in enumerate(stages):
        warmup = min(pp - rank - 1, m)
        for j, alive in stage[m]["alive_at_backward"].items():
            # nothing already backwarded is still referenced; only micro-batches forwarded and not yet
            # backwarded (at most PP of them) are alive when micro-batch j's backward starts
            forwarded = min(m, j + warmup + 1)
            assert set(alive) <= set(range(j, forwarded)), f"stage {rank}, backward {j}: alive {alive}"
            assert j in alive
        assert stage[m]["alive_after"] == [], f"stage {rank}"
        # received student hidden states carry a gradient back; the teacher's do not
        assert all(flags == (True, False) for flags in stage[m]["received_grad_flags"]), f"stage {rank}"


@pytest.mark.parametrize("m", MICROBATCHES)
def test_forward_only_gives_one_process_outputs(pipeline, m):
    pp, stages = pipeline
    _, want = _reference(pp, m)
    got = stages[-1][m]["forward_only"]
    assert len(got) == m
    for (s, t), (ws, wt) in zip(got, want, strict=True):
        torch.testing.assert_close(s, ws, rtol=0, atol=1e-12)
        torch.testing.assert_close(t, wt, rtol=0, atol=1e-12)
    for stage in stages[:-1]:
        assert stage[m]["forward_only"] == []


@pytest.mark.parametrize("times", [1, 2], ids=["m=pp", "m=2pp"])
def test_interleaved_gradients_and_order(pipeline, times):
    """Interleaved 1F1B over 2 chunks a stage: each layer's accumulated gradient equals one process's, every
    stage runs ``interleaved_order``, and the peak in flight is that order's."""
    from megatron_subnet.parallel.pipeline_orders import interleaved_order

    pp, stages = pipeline
    m = times * pp
    want, _ = _reference(pp, m)
    for rank, stage in enumerate(stages):
        case = stage["interleaved"][m]
        for layer, got in case["grads"].items():
            for g, w in zip(got, want[2 * layer : 2 * layer + 2], strict=True):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
        assert case["events"] == interleaved_order(pp, rank, CHUNKS, m), f"stage {rank}"
        running, most = 0, 0
        for kind, _, _ in case["events"]:
            running += 1 if kind == "F" else -1
            most = max(most, running)
        assert case["peak"] == most, f"stage {rank}"


@pytest.mark.parametrize("times", [1, 2], ids=["m=pp", "m=2pp"])
def test_forward_only_interleaved_gives_one_process_outputs(pipeline, times):
    """Forward only round the ring of virtual stages: the last one's outputs are one process's."""
    pp, stages = pipeline
    m = times * pp
    _, want = _reference(pp, m)
    got = stages[-1]["interleaved"][m]["forward_only"]
    assert len(got) == m
    for (s, t), (ws, wt) in zip(got, want, strict=True):
        torch.testing.assert_close(s, ws, rtol=0, atol=1e-12)
        torch.testing.assert_close(t, wt, rtol=0, atol=1e-12)
    for stage in stages[:-1]:
        assert stage["interleaved"][m]["forward_only"] == []


def test_chunked_stages_run_the_whole_model():
    """A GPTModel stage of 2 model chunks (``stage_of(..., chunks=2)``), run chunk by chunk round the ring of
    virtual stages, gives the whole model's logits bit for bit, holds the same state-dict names, and refuses
    a call without ``chunk``; the split of 5 layers over 2 x 2 virtual stages is 2, 1, 1, 1."""
    from megatron_subnet.model.config import ModelConfig
    from megatron_subnet.model.gpt import GPTModel
    from megatron_subnet.parallel.pipeline import PipelineError, split_layers, stage_of

    config = ModelConfig(**tiny(
        "llama", vocab_size=64, hidden_size=32, num_layers=5, num_attention_heads=4, num_query_groups=2,
        head_dim=8, ffn_hidden_size=48, tie_word_embeddings=True,
    ))
    torch.manual_seed(0)
    whole = GPTModel(config).eval()
    counts = split_layers(5, 2, chunks=2)
    assert counts == [2, 1, 1, 1]
    stages = [stage_of(counts, r, chunks=2) for r in range(2)]
    assert [s.chunks for s in stages] == [((0, 1), (3,)), ((2,), (4,))]
    assert [s.layers for s in stages] == [(0, 1, 3), (2, 4)]
    models = [GPTModel(config, stage=s).eval() for s in stages]
    state = whole.state_dict()
    for model in models:
        model.load_state_dict({k: state[k] for k in model.state_dict()})
    assert set(models[0].state_dict()) | set(models[1].state_dict()) == set(state)
    tokens = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        x = tokens
        for virtual in range(4):
            x = models[virtual % 2](x, chunk=virtual // 2)
        assert torch.equal(x, whole(tokens))
        with pytest.raises(ValueError, match="pass chunk="):
            models[0](tokens)
    with pytest.raises(PipelineError, match="more stages than the 3 layers"):
        split_layers(3, 2, chunks=2)
    with pytest.raises(PipelineError, match="one per virtual stage"):
        split_layers(5, 2, [3, 2], chunks=2)
    with pytest.raises(PipelineError, match="not supported with --virtual"):
        split_layers(5, 2, first=1, chunks=2)


def _idle_of_order(pp: int, chunks: int, m: int, forward: float, backward: float) -> float:
    """Every stage's idle fraction when each stage runs its ``interleaved_order`` and every chunk's forward
    (backward) takes ``forward / chunks`` (``backward / chunks``); a forward waits for the previous virtual
    stage's, a backward for the next one's."""
    from megatron_subnet.parallel.pipeline_orders import interleaved_order

    orders = [interleaved_order(pp, rank, chunks, m) for rank in range(pp)]
    done: dict[tuple[str, int, int], float] = {}
    position, clock = [0] * pp, [0.0] * pp
    while any(position[r] < len(orders[r]) for r in range(pp)):
        moved = False
        for r in range(pp):
            while position[r] < len(orders[r]):
                kind, chunk, i = orders[r][position[r]]
                virtual = chunk * pp + r
                dep = ("F", virtual - 1, i) if kind == "F" else ("B", virtual + 1, i)
                if 0 <= dep[1] < pp * chunks and dep not in done:
                    break
                start = max(clock[r], done.get(dep, 0.0))
                clock[r] = done[kind, virtual, i] = start + (forward if kind == "F" else backward) / chunks
                position[r] += 1
                moved = True
        assert moved, "the orders wait on each other"
    return 1 - m * (forward + backward) / max(clock)


@pytest.mark.parametrize("pp, chunks, m", [(2, 2, 2), (2, 2, 8), (2, 3, 4), (4, 2, 4), (4, 2, 8), (4, 4, 16)])
def test_interleaved_order_idles_the_analytical_bubble(pp, chunks, m):
    """With equal chunks the order idles exactly (PP - 1) / (chunks * m + PP - 1), every (chunk, micro-batch)
    runs one forward then one backward on every stage after Megatron's warm-up, and m not a multiple of PP is
    one clear error."""
    from megatron_subnet.parallel.pipeline import PipelineError
    from megatron_subnet.parallel.pipeline_orders import interleaved_order

    assert _idle_of_order(pp, chunks, m, 1.0, 2.0) == pytest.approx((pp - 1) / (chunks * m + pp - 1), abs=1e-12)
    for rank in range(pp):
        order = interleaved_order(pp, rank, chunks, m)
        pairs = [(c, i) for c in range(chunks) for i in range(m)]
        assert sorted((c, i) for k, c, i in order if k == "F") == pairs
        assert sorted((c, i) for k, c, i in order if k == "B") == pairs
        assert all(order.index(("F", c, i)) < order.index(("B", c, i)) for c, i in pairs)
        # Megatron's warm-up: 2 (PP - rank - 1) + (chunks - 1) PP forwards (all when m == PP), then 1F1B
        warmup = chunks * m if m == pp else min(2 * (pp - rank - 1) + (chunks - 1) * pp, chunks * m)
        kinds = "".join(k for k, _, _ in order)
        steady = chunks * m - warmup
        assert kinds == "F" * warmup + "FB" * steady + "B" * warmup, f"stage {rank}"
    with pytest.raises(PipelineError, match="not a multiple of --pipeline-model-parallel-size"):
        interleaved_order(pp, 0, chunks, m + 1)
    with pytest.raises(PipelineError, match="at least 2"):
        interleaved_order(pp, 0, 1, m)


def _pairs_up(traces: list[list[tuple]], pp: int) -> None:
    """Every send meets exactly one receive in the same position on its neighbour: per directed pair of
    ranks, the sender's sends and the receiver's receives are the same messages (and shapes) in the same
    order. ``traces[r]``: rank r's posted ``(Transfer, shapes)`` in order."""
    for a in range(pp):
        for b in range(pp):
            sends = [(t.kind, t.virtual, t.microbatch, shapes) for t, shapes in traces[a] if t.send and t.peer == b]
            recvs = [(t.kind, t.virtual, t.microbatch, shapes) for t, shapes in traces[b] if not t.send and t.peer == a]
            assert sends == recvs, f"rank {a} -> rank {b}"
            assert len(set(sends)) == len(sends), f"rank {a} -> rank {b}: a message twice"


@pytest.mark.parametrize("pp, chunks, m", [(2, 1, 1), (2, 1, 8), (4, 1, 3), (4, 1, 8), (2, 2, 2), (2, 2, 8),
                                           (2, 3, 4), (4, 2, 4), (4, 2, 8), (4, 4, 16)])  # fmt: skip
def test_p2p_plan_pairs_every_send_with_a_receive_in_order(pp, chunks, m):
    """The plan of rounds (training and forward-only orders): each rank runs exactly its order, a message
    arrives in an earlier round than the action that needs it, and per directed pair of ranks the sends and
    receives are the same messages in the same order, one per round at most (so no tags are needed)."""
    from megatron_subnet.parallel.pipeline_orders import forward_only_order, p2p_plan, training_order

    for orders in ([training_order(pp, r, chunks, m) for r in range(pp)], [forward_only_order(pp, chunks, m)] * pp):
        plan = p2p_plan(orders, chunks)
        _pairs_up([[(t, ()) for _, batch in rounds for t in batch] for rounds in plan], pp)
        for r, rounds in enumerate(plan):
            assert [a for a, _ in rounds if a is not None] == orders[r]
            arrived: set = set()
            for action, batch in rounds:
                if action is not None:
                    kind, chunk, i = action
                    virtual = chunk * pp + r
                    needs = ("F", virtual, i) if kind == "F" and virtual > 0 else None
                    if kind == "B" and virtual < pp * chunks - 1:
                        needs = ("B", virtual, i)
                    assert needs is None or needs in arrived, f"rank {r}: {action} before its message"
                arrived |= {(t.kind, t.virtual, t.microbatch) for t in batch if not t.send}
                peers = [(t.peer, t.send) for t in batch]
                assert len(set(peers)) == len(peers), f"rank {r}: two messages one way to one rank in a round"


@pytest.mark.parametrize("m", MICROBATCHES)
def test_1f1b_recorded_sends_and_receives_pair_up(pipeline, m):
    """What each rank really posted in the 1F1B step, recorded by the executor, pairs up with its neighbours."""
    pp, stages = pipeline
    _pairs_up([stage[m]["trace"] for stage in stages], pp)
    assert all(stage[m]["trace"] for stage in stages)


@pytest.mark.parametrize("times", [1, 2], ids=["m=pp", "m=2pp"])
def test_interleaved_recorded_sends_and_receives_pair_up(pipeline, times):
    """The same for the interleaved step, where at PP=2 activations and gradients share each pair of ranks."""
    pp, stages = pipeline
    _pairs_up([stage["interleaved"][times * pp]["trace"] for stage in stages], pp)


def test_the_schedules_run_one_code_path_on_every_backend():
    """1F1B and interleaved run the same code on gloo and NCCL: nothing on the path from the trainer's checks to
    the executor's sends asks which backend runs, and no send or receive carries a tag (NCCL ignores tags).
    Comments and docstrings may name the backends; code may not."""
    import inspect
    import io
    import tokenize

    from megatron_subnet.parallel import pipeline_executor, pipeline_orders
    from megatron_subnet.training import config, engine

    path = [pipeline_orders, pipeline_executor.Messages, pipeline_executor._rounds, pipeline_executor.forward_backward,
            pipeline_executor.forward_only, pipeline_executor._Executor, pipeline_executor._free, engine.train_step,
            config.check_layout]  # fmt: skip
    for part in path:
        tokens = tokenize.generate_tokens(io.StringIO(inspect.getsource(part)).readline)
        code = [t for t in tokens if t.type in (tokenize.NAME, tokenize.STRING, tokenize.OP)]
        names = {t.string for t in code if t.type == tokenize.NAME}
        strings = " ".join(t.string for t in code if t.type == tokenize.STRING and not t.string.startswith('"""'))
        assert not names & {"get_backend", "tag"}, (part, names & {"get_backend", "tag"})
        assert "gloo" not in strings.lower() and "nccl" not in strings.lower(), part
