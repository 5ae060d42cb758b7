"""Frozen-prefix cache: the layers below the lowest trainable one run once per training pair.

When LoRA sits only in layers L..N-1, the embeddings and layers 0..L-1 are frozen, so the hidden
states entering layer L depend on the tokens alone. They are kept from the reference pass (which
runs those layers anyway, see ``record_layer_inputs``) or captured the first time a pair is seen
(a forward that stops at layer L, without autograd); every later step feeds them straight to
layer L and runs only layers L..N-1, the final norm and the head.

The model's own forward still builds the attention mask and rotary tables for layer L and above
(they depend on positions only), so any architecture whose decoder layers ``find_decoder_layers``
finds works the same way: during a replay, layers 0..L-1 return their input unchanged and a
pre-hook on layer L swaps in the cached states. ``PairScorer.verify`` compares the result with
the plain path once, and falls back to it if an architecture does something else between layers.
Dropout inside the frozen layers (none in Llama-family models) would be sampled once, at capture.

Memory: one float32 vector of the hidden size per token: with one prompt pass, (prompt + chosen +
rejected) x hidden x 4 bytes per pair, 0.43 MiB on average for SmolLM2 (hidden 576, 188 tokens
per pair on hh-rlhf at max length 256); 64 pairs take 28 MiB, the default 2 GiB budget ~4,800
pairs. Memory, not disk: the states live for one training run (L differs between strategies)
and fit easily at this scale. Pairs beyond the budget are recomputed at each step, which is
exact, only slower; spilling them to disk would be cheaper (0.4 MiB read against ~1.3 GFLOP per
frozen layer per pair) but is not implemented.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Hashable, Sequence

import torch
from peft import PeftModel
from torch import nn

from hialign.partition import find_decoder_layers

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 2 * 2**30


class _Captured(Exception):
    """Raised by the capture hook to stop the forward once layer L's input is known."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("frozen prefix captured")
        self.hidden = hidden


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def first_trainable_layer(model: nn.Module) -> int | None:
    """Index of the lowest decoder layer with a trainable parameter; 0 when the input embeddings
    train too; None when no decoder layer trains."""
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    _, layers = find_decoder_layers(causal_lm)
    first = next(
        (i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())),
        None,
    )
    embeddings = causal_lm.get_input_embeddings()
    if first is not None and any(p.requires_grad for p in embeddings.parameters()):
        return 0
    return first


class FrozenPrefixCache:
    """Hidden states at the input of the lowest trainable layer, per row key.

    Args:
        model: the (PEFT) model being trained; its trainable parameters must stay where they are
            while the cache lives.
        max_bytes: memory budget for stored rows.
    """

    def __init__(self, model: nn.Module, max_bytes: int = DEFAULT_MAX_BYTES):
        causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
        self.layers = find_decoder_layers(causal_lm)[1]
        self.start = first_trainable_layer(model) or 0
        self.max_bytes = max_bytes
        self.store: dict[Hashable, torch.Tensor] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._tuple_output: bool | None = None

    @property
    def active(self) -> bool:
        """True when some layers below the trainable ones can be skipped."""
        return self.start > 0

    def describe(self) -> str:
        rows = len(self.store)
        per_row = self.bytes / rows / 2**20 if rows else 0.0
        return (
            f"frozen-prefix cache: layers 0-{self.start - 1} skipped, {rows} rows stored, "
            f"{self.bytes / 2**20:.1f} MiB ({per_row:.2f} MiB per row), "
            f"{self.hits} hits, {self.misses} misses"
        )

    def preload(self, states: dict[Hashable, torch.Tensor]) -> int:
        """Take rows captured elsewhere (e.g. during the reference pass, see
        ``record_layer_inputs``), within the budget; returns how many were taken."""
        taken = 0
        for key, row in states.items():
            if key not in self.store and self.bytes + row.nbytes <= self.max_bytes:
                self.store[key] = row
                self.bytes += row.nbytes
                taken += 1
        return taken

    def capture(self, run: Callable[[], object]) -> torch.Tensor:
        """Run ``run`` (a forward of the model) only up to layer ``start``; return its input.

        Returns:
            (R, L, H) hidden states entering layer ``start``, computed without autograd.
        """

        def stop(module, args, kwargs):
            raise _Captured(_hidden_arg(args, kwargs))

        def record(module, args, output):
            self._tuple_output = isinstance(output, tuple)

        handles = [
            self.layers[self.start].register_forward_pre_hook(stop, with_kwargs=True),
            self.layers[self.start - 1].register_forward_hook(record),
        ]
        try:
            with torch.no_grad():
                run()
        except _Captured as captured:
            return captured.hidden
        finally:
            for handle in handles:
                handle.remove()
        raise RuntimeError(f"the forward never reached decoder layer {self.start}")

    def hidden_states(
        self,
        keys: Sequence[Hashable],
        lengths: Sequence[int],
        width: int,
        run_rows: Callable[[list[int]], object],
    ) -> torch.Tensor:
        """(R, width, H) states entering layer ``start`` for rows ``keys``, from the store where
        possible; ``run_rows(rows)`` runs the model's forward on the listed rows of the batch."""
        missing = [i for i, key in enumerate(keys) if key not in self.store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = self.capture(lambda: run_rows(missing)) if missing else None
        for j, i in enumerate(missing):
            row = fresh[j, : lengths[i]].clone()
            if self.bytes + row.nbytes <= self.max_bytes:
                self.store[keys[i]] = row
                self.bytes += row.nbytes
        if fresh is not None and len(missing) == len(keys):
            return fresh

        sample = fresh if fresh is not None else self.store[keys[0]]
        hidden = sample.new_zeros((len(keys), width, sample.shape[-1]))
        fresh_row = {i: j for j, i in enumerate(missing)}
        for i, key in enumerate(keys):
            if i in fresh_row:
                hidden[i] = fresh[fresh_row[i]]
            else:
                hidden[i, : lengths[i]] = self.store[key]
        return hidden

    @contextlib.contextmanager
    def replaying(self, hidden: torch.Tensor):
        """Inside, a forward of the model skips layers 0..start-1 and feeds ``hidden`` (R, L, H)
        to layer ``start``; mask, positions and everything above come from the model itself."""

        def passthrough_for(layer):
            def passthrough(hidden_states, *args, **kwargs):
                if self._tuple_output is None:  # never captured: learn it from one real call
                    output = type(layer).forward(layer, hidden_states, *args, **kwargs)
                    self._tuple_output = isinstance(output, tuple)
                return (hidden_states,) if self._tuple_output else hidden_states

            return passthrough

        def inject(module, args, kwargs):
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        # Instance attributes shadow the class's forward; saved ones (e.g. accelerate's device
        # hooks also wrap forward this way) are put back afterwards.
        saved = [layer.__dict__.get("forward") for layer in self.layers[: self.start]]
        for layer in self.layers[: self.start]:
            layer.forward = passthrough_for(layer)
        handle = self.layers[self.start].register_forward_pre_hook(inject, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for layer, forward in zip(self.layers[: self.start], saved):
                if forward is None:
                    del layer.forward
                else:
                    layer.forward = forward


@contextlib.contextmanager
def record_layer_inputs(model: nn.Module, layers: Sequence[int]):
    """Inside, every forward of ``model`` leaves the hidden states entering each of ``layers``
    in the yielded dict (layer -> (R, L, H) tensor, overwritten by the next forward).

    The reference pass runs every layer of the frozen base anyway, so the states a strategy's
    frozen prefix produces can be kept from it for free: each strategy whose lowest trained
    layer is one of ``layers`` then skips the capture pass in its first epoch as well.
    """
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    stack = find_decoder_layers(causal_lm)[1]
    latest: dict[int, torch.Tensor] = {}

    def hook_for(index):
        def hook(module, args, kwargs):
            latest[index] = _hidden_arg(args, kwargs).detach()

        return hook

    handles = [
        stack[i].register_forward_pre_hook(hook_for(i), with_kwargs=True) for i in layers if i > 0
    ]
    try:
        yield latest
    finally:
        for handle in handles:
            handle.remove()
