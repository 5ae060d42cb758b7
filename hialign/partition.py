"""Stage 1 — partition a causal LM's decoder layers into contiguous functional blocks.

Rule: N layers split into K contiguous blocks whose sizes differ by at most one; when K does
not divide N, the *first* N mod K blocks get one extra layer (like ``numpy.array_split``).
So 30 layers -> 0-9 / 10-19 / 20-29 and 32 layers -> 0-10 / 11-21 / 22-31 (11/11/10).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

DEFAULT_BLOCK_NAMES = ("local", "mid", "global")
FULL = "full"

# Attention projection names by architecture family, checked in order.
ATTENTION_PROJECTIONS = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # Llama, Qwen, Mistral, Gemma, Phi-3 MoE, ...
    ("qkv_proj", "o_proj"),  # Phi-3
    ("c_attn", "c_proj"),  # GPT-2 style (fused qkv, Conv1D)
    ("query_key_value", "dense"),  # GPT-NeoX, Falcon
    ("Wqkv", "out_proj"),  # MPT
)
ATTENTION_CONTAINERS = ("self_attn", "attn", "attention", "self_attention")


class PartitionError(ValueError):
    """The model's layers or attention modules cannot be found, or the strategy is invalid."""


@dataclass(frozen=True)
class Block:
    name: str
    layers: tuple[int, ...]

    @property
    def span(self) -> str:
        return f"{self.layers[0]}-{self.layers[-1]}" if self.layers else "(empty)"


def partition_layers(
    num_layers: int, num_blocks: int = 3, names: tuple[str, ...] | None = None
) -> list[Block]:
    """Split ``num_layers`` into ``num_blocks`` contiguous blocks, earlier blocks larger."""
    if num_blocks < 1 or num_layers < num_blocks:
        raise PartitionError(f"cannot split {num_layers} layers into {num_blocks} blocks")
    names = names or (DEFAULT_BLOCK_NAMES if num_blocks == 3 else None)
    names = names or tuple(f"block{i}" for i in range(num_blocks))
    if len(names) != num_blocks:
        raise PartitionError(f"{len(names)} block names given for {num_blocks} blocks")

    base, extra = divmod(num_layers, num_blocks)
    blocks, start = [], 0
    for i, name in enumerate(names):
        size = base + (1 if i < extra else 0)
        blocks.append(Block(name, tuple(range(start, start + size))))
        start += size
    return blocks


def blocks_from_spans(spec: str, num_layers: int) -> list[Block]:
    """Parse explicit blocks like ``0-9,10-19,20-29``; they must cover every layer once."""
    blocks = []
    for part in spec.split(","):
        try:
            lo, hi = (int(x) for x in part.strip().split("-"))
        except ValueError as err:
            raise PartitionError(f"block {part!r} is not of the form START-END") from err
        blocks.append(Block(None, tuple(range(lo, hi + 1))))  # type: ignore[arg-type]
    names = DEFAULT_BLOCK_NAMES if len(blocks) == 3 else [f"block{i}" for i in range(len(blocks))]
    blocks = [Block(n, b.layers) for n, b in zip(names, blocks)]
    check_partition(blocks, num_layers)
    return blocks


def check_partition(blocks: list[Block], num_layers: int) -> None:
    """Raise unless the blocks are non-empty, contiguous, ordered and cover each layer once."""
    covered = [layer for block in blocks for layer in block.layers]
    if any(not b.layers for b in blocks):
        raise PartitionError("a block is empty")
    if covered != list(range(num_layers)):
        raise PartitionError(
            f"blocks {[b.span for b in blocks]} do not cover layers 0-{num_layers - 1} "
            "exactly once, in order"
        )


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (dotted path, module list) of the decoder layer stack of any HF causal LM.

    The stack is the longest ``nn.ModuleList`` whose length equals ``config.num_hidden_layers``
    (or, without a config, the longest ModuleList of identical blocks).
    """
    config = getattr(model, "config", None)
    expected = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(m) for m in module}) == 1
    ]
    if expected is not None:
        candidates = [(n, m) for n, m in candidates if len(m) == expected]
    if not candidates:
        raise PartitionError(
            f"no decoder layer list found in {type(model).__name__} "
            f"(expected a ModuleList of {expected} identical layers)"
        )
    return max(candidates, key=lambda c: (len(c[1]), -c[0].count(".")))


def attention_modules(model: nn.Module) -> tuple[list[str], str]:
    """Return (attention projections relative to a layer, layer-list path).

    E.g. ``(["self_attn.q_proj", ..., "self_attn.o_proj"], "model.layers")`` for Llama.
    Names are qualified by their attention container so that GPT-2's ``attn.c_proj`` is not
    confused with its feed-forward ``mlp.c_proj``. Raises ``PartitionError`` naming what was
    found when no known family matches.
    """
    path, layers = find_decoder_layers(model)
    submodules = dict(layers[0].named_modules())
    for container in ATTENTION_CONTAINERS:
        for projections in ATTENTION_PROJECTIONS:
            names = [f"{container}.{p}" for p in projections]
            if all(isinstance(submodules.get(n), nn.Module) for n in names):
                return names, path
    attn_like = sorted(n for n in submodules if "attn" in n or "attention" in n)
    raise PartitionError(
        f"unknown attention layout in {type(layers[0]).__name__}: found submodules "
        f"{attn_like or sorted(submodules)[:20]}; known projection sets are "
        f"{[list(p) for p in ATTENTION_PROJECTIONS]} inside one of {list(ATTENTION_CONTAINERS)}"
    )


def target_module_names(model: nn.Module, layers: list[int]) -> list[str]:
    """Fully qualified names of the attention projections of ``layers``."""
    projections, path = attention_modules(model)
    return [f"{path}.{i}.{p}" for i in layers for p in projections]


def parse_strategy(strategy: str, blocks: list[Block]) -> list[int]:
    """Layers a strategy trains: ``full``, a block name, or a ``+``-union like ``local+global``."""
    by_name = {b.name: b for b in blocks}
    if strategy == FULL:
        return sorted(layer for b in blocks for layer in b.layers)
    layers: set[int] = set()
    for part in strategy.split("+"):
        if part not in by_name:
            raise PartitionError(
                f"unknown block {part!r} in strategy {strategy!r}; "
                f"choose from {[FULL, *by_name]} or a '+'-union of blocks"
            )
        layers.update(by_name[part].layers)
    return sorted(layers)


def format_block_map(blocks: list[Block]) -> str:
    """One line per block: name, layer span and count."""

    def count(block: Block) -> str:
        return f"{len(block.layers)} layer" + ("s" if len(block.layers) != 1 else "")

    return "\n".join(f"{b.name:>8}: layers {b.span:>7} ({count(b)})" for b in blocks)
