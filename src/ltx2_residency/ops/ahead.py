"""Merging ahead: the next phase's exact merge rides behind the current phase's last DiT calls.

A DiT call runs its blocks in order, and once the last call of stage 1 has passed a block, that
block's weights are free: its part of stage 2's merge can start then, on a side stream, while the
call goes on through the later blocks. Stage 1 of an LTX-2 request is host-bound at its token
counts (the GPU idles between launches), so most of the merge fills those gaps and the switch to
stage 2 is left with the tail (the last blocks) and one host sync for the finiteness check.
Announced two calls or more ahead, a strategy that can (``fused``) splits the merge: its check
(the undo records, the weights only read) is launched at once, behind the calls before the
last, and the last call's gaps are left with the writes, about half the work.

The mechanism only: the phase switch decides when (``Request.prepare``), the machine holds the
state (``merging_ahead``), and the forward guard counts the calls (:meth:`MergeAhead.admit`).
The merge is the stack's own (:meth:`MergeStack.open` / ``merge_layers`` / ``close``), so the
bits, the undo records and the last-in-first-out undo are those of an ordinary merge; only
when each group of layers is launched differs. On the CPU there is no stream: each group merges
inline, in the hook, which is what the CPU tests exercise.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import ForwardGuardError
from .graph_hooks import eager_only, outside_graphs
from .merge import MergeStack
from .side_stream import SideStream
from .undo import LayerTarget, MergeFrame

OUTSIDE = ""  # the group of layers that sit in no numbered block (merged when the call ends)


def tensors_in(output: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a module's output (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from tensors_in(item)
    elif isinstance(output, dict):  # diffusers' BaseOutput is a dict too
        for item in output.values():
            yield from tensors_in(item)


def block_of(name: str) -> str:
    """The block a layer belongs to: its path up to the first numbered module
    (``transformer_blocks.7.attn1.to_q`` -> ``transformer_blocks.7``), :data:`OUTSIDE` if none."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return OUTSIDE


def blocks_of(root: nn.Module) -> list[nn.Module]:
    """The numbered blocks of ``root`` (``transformer_blocks.0``, ...): the blocks merging ahead
    groups layers by (:func:`block_of` of a layer inside one)."""
    return [m for name, m in root.named_modules() if name and block_of(f"{name}.x") == name]


def _block_order(block: str) -> tuple[bool, tuple[str | int, ...]]:
    """``transformer_blocks.2`` before ``transformer_blocks.10``; layers in no block last."""
    return block == OUTSIDE, tuple(int(p) if p.isdigit() else p for p in block.split("."))


def by_block(targets: list[LayerTarget]) -> dict[str, list[LayerTarget]]:
    """``targets`` grouped by block, in first-seen order (each group one slice of a frame)."""
    groups: dict[str, list[LayerTarget]] = {}
    for t in targets:
        groups.setdefault(block_of(t.name), []).append(t)
    return groups


class MergeAhead:
    """One phase's merge, opened now and launched block by block during the next ``calls`` DiT
    calls: each block's group after the last of those calls has run the block (with
    ``calls > 1``, checked first, see :meth:`MergeStack.record_ahead`).

    A block that runs again after its group was launched is refused (its weights are no longer
    the phase's); so is any DiT call beyond ``calls``. Both raise :class:`ForwardGuardError`
    before the block or call runs, and the request's restore undoes what was launched.

    Any failure inside a hook (a refusal, a merge that fails) is kept in :attr:`failed`: the
    caller may catch the DiT call's exception, but the merge is broken for good, so every later
    call and the switch refuse, and the request's restore undoes what was launched.
    """

    def __init__(self, root: nn.Module, stack: MergeStack, plan: list[tuple[str, float, list[LayerTarget]]],
                 calls: int, stream: SideStream) -> None:
        self.stack = stack
        self.stream = stream
        self.calls_left = calls
        # blocks by index (a ModuleList's order: the order a DiT runs them); a frame's layers are
        # planned, and launched, in that order
        self.frames: list[tuple[MergeFrame, dict[str, list[LayerTarget]]]] = []
        for lora, strength, targets in plan:
            groups = dict(sorted(by_block(targets).items(), key=lambda g: _block_order(g[0])))
            self.frames.append((stack.open(lora, [t for g in groups.values() for t in g], strength), groups))
        # Only the first LoRA rides behind the calls; the others merge at the switch, once it is
        # closed: a later LoRA's records are taken against the weights with the earlier merged
        # in, and an earlier frame's retry (tiles without room) must come before anything above it.
        first = self.frames[0] if self.frames else None
        # with calls to spare before the last one, its records are taken now, behind them (the
        # weights are only read): the last call's gaps are left with the writes, half the work
        self.recorded_ahead = False
        if calls > 1 and first is not None:
            with self.stream.running():
                self.recorded_ahead = stack.record_ahead(first[0])
        self.pending = sorted(first[1], key=_block_order) if first is not None else []
        self.passed: set[str] = set()  # blocks the last call has run (launched, or waiting for earlier ones)
        self.failed: BaseException | None = None  # a hook's failure: the merge cannot be completed
        self.armed = True  # the hooks act only while armed (a hook removal cut short leaves them inert)
        # each call on the high-priority stream: the merge's tiles then wait for the call's kernels,
        # not the call's for the merge's (a hook that always runs, so a failing call switches back)
        self._caller: torch.cuda.Stream | None = None
        self._hooks: list[Any] = []
        try:
            # one handle a statement: each is kept the moment it exists, so a failure (or Ctrl-C)
            # part way removes every hook registered so far
            # on a compiled DiT the blocks' hooks are traced away (ops.graph_hooks): the whole
            # merge is then launched when the last call is done
            call_done = outside_graphs(self._guarded(self._call_done))
            self._hooks.append(root.register_forward_pre_hook(outside_graphs(self._call_starts)))
            self._hooks.append(root.register_forward_hook(call_done))
            self._hooks.append(root.register_forward_hook(outside_graphs(self._call_ends), always_call=True))
            for block in self.pending:
                if block != OUTSIDE:
                    module = root.get_submodule(block)
                    starts, done = eager_only(self._block_starts(block)), eager_only(self._block_done(block))
                    self._hooks.append(module.register_forward_pre_hook(starts))
                    self._hooks.append(module.register_forward_hook(done))
        except BaseException:
            self.disarm()
            raise

    def admit(self) -> None:
        """A DiT call starts (called by the forward guard)."""
        self.refuse_if_failed()
        if self.calls_left <= 0:
            raise ForwardGuardError(
                "the DiT ran after the calls its request announced with req.prepare(): the next "
                "phase's merge is under way; enter that phase (req.enter) to run the DiT again")
        self.calls_left -= 1

    def refuse_if_failed(self) -> None:
        if self.failed is not None:
            raise ForwardGuardError(
                f"the next phase's merge, started ahead with req.prepare(), failed ({self.failed!r}); "
                "the request cannot go on: leave its `with` block (the weights are rolled back) and "
                "open a new request")

    def _guarded(self, hook: Any) -> Any:
        """``hook``, inert once disarmed, and remembered as the merge's failure if it raises."""
        def run(*args: Any) -> Any:
            if not self.armed:
                return None
            try:
                return hook(*args)
            except BaseException as exc:
                if self.failed is None:
                    self.failed = exc
                raise
        return run

    def _block_starts(self, block: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if block in self.passed:
                raise ForwardGuardError(
                    f"block {block!r} ran again in the last call announced with req.prepare(), after "
                    "its weights were merged for the next phase; for a model that runs a block "
                    "twice in one call, prepare after the phase's last call instead")
        return self._guarded(hook)

    def _block_done(self, block: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.calls_left == 0:
                self.passed.add(block)
                # in plan order: a block run before an earlier one waits for it (frames are planned
                # in block-index order; launching out of it would misplace the layers' records)
                while self.pending and self.pending[0] in self.passed:
                    self._launch(self.pending[0])
        return self._guarded(hook)

    def _call_starts(self, module: nn.Module, args: Any) -> None:
        if self.armed and self._caller is None:
            # recorded before the switch: an interrupt between the two still finds the way back
            self._caller = self.stream.behind()
            if self._caller is not None:
                self.stream.hurry(self._caller)

    def _call_ends(self, module: nn.Module, args: Any, output: Any) -> None:
        self._hand_back(tensors_in(output))

    def _hand_back(self, made: Iterable[torch.Tensor] = ()) -> None:
        caller = self._caller
        if caller is not None:
            self.stream.hand_back(caller, made)
            self._caller = None  # only once back: handing back twice is harmless, never is not

    def _call_done(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.calls_left == 0:
            self._launch_rest()  # blocks the call did not run, and the layers in no block

    def _launch_rest(self) -> None:
        while self.pending:
            self._launch(self.pending[0])

    def _launch(self, block: str) -> None:
        frame, groups = self.frames[0]
        self.passed.add(block)
        with self.stream.running():  # after the call's work so far on the caller's stream
            self.stack.merge_layers(frame, groups.get(block, []), launch=True)
        self.pending.pop(0)  # only once launched: a failure above leaves it pending (and the merge failed)

    def complete(self) -> int:
        """The switch itself: the rest launched, the caller's stream ordered after the merge, the
        first frame closed (the host sync that checks finiteness), then any later LoRA merged
        as usual. Returns weight bytes written."""
        self.refuse_if_failed()
        self.disarm()
        self._launch_rest()
        self.stream.join()
        written = 0
        for i, (frame, groups) in enumerate(self.frames):
            if i:
                self.stack.merge_layers(frame, [t for g in groups.values() for t in g])
            written += self.stack.close(frame)
        return written

    def disarm(self) -> None:
        """Remove the hooks (and leave the urgent stream, should an interrupt have skipped the
        hook that does); what was launched stays on the stack (an undo takes it from there).
        Idempotent, and safe to interrupt: the hooks go inert first, and each is forgotten only
        once removed."""
        self.armed = False
        while self._hooks:
            self._hooks[-1].remove()
            self._hooks.pop()
        self._hand_back()

    def abandon(self) -> None:
        """A failure before the switch: stop, and order the caller's stream after what was launched,
        so the undo that follows sees it written."""
        self.disarm()
        self.stream.join()

