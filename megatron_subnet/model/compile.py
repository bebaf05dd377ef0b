"""``--compile``: torch.compile each transformer layer in place (torchtitan's per-block scheme).

Each ``TransformerLayer`` compiles its own forward (``nn.Module.compile``): the module stays where it is
in ``model.layers``, so state-dict names (``layers.{i}.…``, which checkpoints depend on) do not change,
and the embedding, rotary tables, final norm and output layer stay eager. Layers of one shape share a
compiled graph (dynamo inlines the module and takes its parameters as inputs), so compile time does not
grow with depth. Full recomputation checkpoints the compiled layer: backward re-runs the compiled forward.

Shapes: the default (``dynamic=None``) compiles the first shapes it sees as static, and when a shape
changes (another sequence length, or a sub-network selection whose index tensors have other lengths)
recompiles once with those sizes symbolic, which then serves every further selection. ``dynamic=False``
would recompile for each new selection shape until dynamo's recompile limit, then run that layer eager.
Index tensors are graph inputs: a new selection of the same sizes reuses the compiled graph. A layer
index that keeps a whole dimension (``None``) or switches grouped-query attention on or off is another
graph.

Under tensor parallelism, a masked layer whose shard on this rank keeps no head or no MLP neuron runs
eager (``GPTModel.run_layer``): there inductor (torch 2.13, CPU) schedules the read of an all-reduce's
result before the all-reduce when its input is a matmul over an empty dimension, so that rank's layer
output misses the other ranks' sum. Dense layers, and shards that keep something, stay compiled.
"""

from __future__ import annotations

from megatron_subnet.model.gpt import GPTModel


def compile_model(model: GPTModel, **options) -> GPTModel:
    """Compile ``model``'s layers in place (``options``: ``torch.compile``'s, e.g. ``backend``, ``mode``,
    ``dynamic``, ``fullgraph``); returns ``model``. Call it after moving the model to its device."""
    for layer in model.layers:
        layer.compile(**options)
    return model
