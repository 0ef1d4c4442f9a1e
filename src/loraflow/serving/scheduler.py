"""One generation loop for every request, whatever adapter it asks for.

Requests become `Sequence`s and wait in a queue; a single thread runs steps. Each step, under the
model lock (swap work goes between steps, see serving.model):

1. waiting sequences are admitted while the batch has room (`max_batch`): their prompts are run
   together in one forward (left-padded), which yields their first token and their KV cache;
2. that cache is merged into the batch's (rows left-padded to one length, concatenated);
3. one decode forward runs every row of the batch, one token each, each row with its own adapter
   (PEFT's mixed-adapter batches, `adapter_names=[...]`);
4. rows that finished (max_tokens, an end token, a stop string) leave the batch.

So requests join and leave at step granularity (continuous batching). Why this design on a CPU:
a decode step of one row reads every weight once for a single token and is bound by memory
bandwidth, so batching rows costs little more than one; a paged KV cache (vLLM) saves memory
copies at the price of custom attention kernels, which torch's CPU build does not have. Here the
batch keeps one padded cache tensor per layer; joining and leaving copy it (index_select, pad),
and columns every remaining row has as padding are trimmed. A row's output equals its output
alone because its padding is masked out of attention and its positions count only its own tokens
(`position_ids` from the attention mask), as in `generate` with left padding.

`max_batch=1` admits a sequence only when the batch is empty: one request at a time, the
behaviour of the service before this scheduler (kept for comparison, `loraflow serve --max-batch 1`).
"""

from __future__ import annotations

import collections
import inspect
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from loraflow.errors import LoraflowError
from loraflow.log import get_logger

log = get_logger("serving")


class GenerationFailed(LoraflowError):
    """The generation loop failed while this request was in its batch."""


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


class Sequence:
    """One prompt being generated. The consumer reads `events()` (streaming) or `result()`."""

    def __init__(self, entry, prompt_ids: list[int], sampling: Sampling, decode) -> None:
        self.entry = entry  # serving.model.Loaded: the adapter version, fixed for the whole sequence
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        # The holder's decode: the fast tokenizer is shared with request threads that encode, and
        # Rust tokenizers fail "Already borrowed" when two threads use one at once.
        self.decode = decode
        self.generated: list[int] = []
        self.emitted = ""  # text handed to the consumer so far
        self.finish_reason: str | None = None
        self.cancelled = False
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._generator = None
        if sampling.temperature > 0 and sampling.seed is not None:
            import torch

            self._generator = torch.Generator().manual_seed(sampling.seed)

    # --- the generation loop's side --------------------------------------------------------------
    def _text(self, final: bool) -> tuple[str, bool]:
        """The text that may be shown now, and whether a stop string ended it."""
        text = self.decode(self.generated)
        stops = self.sampling.stop
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut], True
        if not final:
            # Hold back what could still become a stop string, or half of a multi-byte character.
            hold = max((len(s) - 1 for s in stops), default=0)
            if hold:
                text = text[: max(len(self.emitted), len(text) - hold)]
            text = text.rstrip("\ufffd")
        return text, False

    def _push(self, token: int, eos: set[int]) -> bool:
        """Take one generated token; True when the sequence is finished."""
        if token in eos:
            self._finish("stop")
            return True
        self.generated.append(token)
        done = len(self.generated) >= self.sampling.max_tokens
        text, stopped = self._text(final=done)
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            self._events.put(("text", text[len(self.emitted):]))
            self.emitted = text
        if stopped:
            self._finish("stop")
            return True
        if done:
            self._finish("length")
            return True
        return False

    def _finish(self, reason: str) -> None:
        if reason == "stop" or self.finish_reason is None:
            text, _ = self._text(final=True)
            if len(text) > len(self.emitted) and text.startswith(self.emitted):
                self._events.put(("text", text[len(self.emitted):]))
                self.emitted = text
        self.finish_reason = reason
        self._events.put(("done", reason))

    def _fail(self, exc: BaseException) -> None:
        self.finish_reason = "error"
        self._events.put(("error", exc))

    # --- the consumer's side ---------------------------------------------------------------------
    def events(self) -> Iterator[tuple[str, str]]:
        """("text", piece) ... then ("done", finish_reason); raises what failed the generation."""
        while True:
            kind, value = self._events.get()
            if kind == "error":
                raise value
            yield kind, value
            if kind == "done":
                return

    def result(self) -> str:
        for _ in self.events():
            pass
        return self.emitted

    @property
    def completion_tokens(self) -> int:
        return len(self.generated)


def forward(model, **inputs):
    """Every forward of generation goes through here (one place for precision contexts)."""
    import torch

    from loraflow.modeling import autocast, precision_of

    with torch.inference_mode(), autocast(precision_of(model)):
        return model(**inputs)


class _Cache:
    """transformers' KV cache for this model: its keyword (`cache` from transformers 5.24,
    `past_key_values` before) and the per-layer (key, value) tensors of an output."""

    def __init__(self, model) -> None:
        params = inspect.signature(model.get_base_model().forward).parameters
        self.kwarg = "cache" if "cache" in params else "past_key_values"

    def tensors(self, output) -> list[list]:
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        return [[layer.keys, layer.values] for layer in cache.layers]

    @staticmethod
    def build(tensors):
        from transformers import DynamicCache

        return DynamicCache([tuple(kv) for kv in tensors])


class Batch:
    """Rows being generated together: their sequences, one KV cache (a padded tensor pair per
    layer), the attention mask over it. The caller holds the model lock."""

    def __init__(self) -> None:
        self.rows: list[Sequence] = []
        self._kv: list[list] | None = None
        self._mask = None

    def clear(self) -> list[Sequence]:
        rows, self.rows, self._kv, self._mask = self.rows, [], None, None
        return rows

    def prefill(self, model, new: list[Sequence], eos: set[int]) -> list[Sequence]:
        """Run the new sequences' prompts (left-padded, one forward), take their first tokens and
        merge their cache into the batch's; returns the sequences that finished."""
        import torch
        import torch.nn.functional as F

        cache = _Cache(model)
        width = max(len(seq.prompt_ids) for seq in new)
        pad = min(eos) if eos else 0  # any id: padded positions are masked out
        ids = torch.tensor([[pad] * (width - len(s.prompt_ids)) + s.prompt_ids for s in new], device=model.device)
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in new],
                            device=model.device)
        out = forward(model, input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                      adapter_names=[s.entry.slot for s in new], use_cache=True, logits_to_keep=1)
        kv = cache.tensors(out)
        tokens = _sample(out.logits[:, -1], new)
        done = [seq._push(t, eos) or seq.cancelled for seq, t in zip(new, tokens)]
        if self.rows:
            # Align both groups on the right: the shorter one gets padding columns on the left.
            old_len, new_len = self._mask.shape[1], mask.shape[1]
            total = max(old_len, new_len)

            def left(t, n):
                return F.pad(t, (0, 0, n, 0)) if n else t

            kv = [[torch.cat([left(a, total - old_len), left(b, total - new_len)], dim=0) for a, b in zip(old, nw)]
                  for old, nw in zip(self._kv, kv)]
            mask = torch.cat([F.pad(self._mask, (total - old_len, 0)), F.pad(mask, (total - new_len, 0))], dim=0)
        self.rows, self._kv, self._mask = [*self.rows, *new], kv, mask
        return self._retire([False] * (len(self.rows) - len(new)) + done)

    def decode(self, model, eos: set[int]) -> list[Sequence]:
        """One token for every row, each with its own adapter; returns the sequences that finished."""
        import torch

        cache = _Cache(model)
        last = torch.tensor([[seq.generated[-1]] for seq in self.rows], device=model.device)
        mask = torch.cat([self._mask, self._mask.new_ones(len(self.rows), 1)], dim=1)
        out = forward(model, input_ids=last, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                      adapter_names=[seq.entry.slot for seq in self.rows], use_cache=True,
                      **{cache.kwarg: cache.build(self._kv)})
        self._kv, self._mask = cache.tensors(out), mask
        tokens = _sample(out.logits[:, -1], self.rows)
        return self._retire([seq._push(t, eos) or seq.cancelled for seq, t in zip(self.rows, tokens)])

    def _retire(self, done: list[bool]) -> list[Sequence]:
        import torch

        if not any(done):
            return []
        finished = [seq for seq, d in zip(self.rows, done) if d]
        keep = [i for i, d in enumerate(done) if not d]
        for seq in finished:
            if seq.finish_reason is None:  # cancelled by its consumer
                seq._finish("cancelled")
        if not keep:
            self.clear()
            return finished
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        # Columns that are padding in every remaining row carry nothing: drop them.
        first = int(mask.any(dim=0).nonzero()[0])
        self._mask = mask[:, first:]
        self._kv = [[t.index_select(0, index)[:, :, first:] for t in kv] for kv in self._kv]
        self.rows = [self.rows[i] for i in keep]
        return finished


def _sample(logits, rows: list[Sequence]) -> list[int]:
    import torch

    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for i, seq in enumerate(rows):
        s = seq.sampling
        if s.temperature <= 0:
            tokens.append(greedy[i])
            continue
        probs = torch.softmax(logits[i].float() / s.temperature, dim=-1)
        if s.top_p < 1:
            ordered, order = probs.sort(descending=True)
            keep = ordered.cumsum(-1) - ordered < s.top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
        tokens.append(int(torch.multinomial(probs.cpu(), 1, generator=seq._generator)))
    return tokens


def serving_greedy(holder, entry, new_tokens: int):
    """The serving path's greedy generation of one prompt with `entry` (`Callable[[list[int]],
    list[int]]`, as loraflow.parity takes): the same prefill and decode steps as a request, in a
    batch of its own. For checks that already hold the model lock (the canary)."""

    def run(prompt_ids: list[int]) -> list[int]:
        seq = Sequence(entry, list(prompt_ids), Sampling(max_tokens=new_tokens), holder.decode)
        batch = Batch()
        batch.prefill(holder.model, [seq], holder.eos_ids)
        while batch.rows:
            batch.decode(holder.model, holder.eos_ids)
        return list(seq.generated)

    return run


class Scheduler:
    def __init__(self, holder, *, max_batch: int = 16) -> None:
        self.holder = holder
        self.max_batch = max_batch
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.batch = Batch()
        self.steps = 0
        self.peak_batch = 0

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="loraflow-generate", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(30)

    def submit(self, seq: Sequence) -> Sequence:
        with self._cond:
            self._waiting.append(seq)
            self._cond.notify_all()
        return seq

    @property
    def depth(self) -> int:
        """Sequences waiting to join the batch."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self.batch.rows)

    # --- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self.batch.rows:
                    self._cond.wait()
                if self._stop:
                    failed = [*self._waiting, *self.batch.clear()]
                    self._waiting.clear()
                    break
            finished: list[Sequence] = []
            try:
                with self.holder.lock.hold():
                    finished = self._step()
            except Exception as exc:  # noqa: BLE001 - fail the batch's requests, keep the loop alive
                log.exception("generation step failed")
                finished = self.batch.clear()
                for seq in finished:
                    seq._fail(GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}"))
            for seq in finished:
                self.holder.release(seq.entry)
        for seq in failed:
            seq._fail(GenerationFailed("the server is shutting down"))
            self.holder.release(seq.entry)

    def _admit(self, finished: list[Sequence]) -> list[Sequence]:
        with self._cond:
            room = self.max_batch - len(self.batch.rows)
            new = []
            while room > 0 and self._waiting:
                seq = self._waiting.popleft()
                if seq.cancelled:  # its client left before it started
                    seq._finish("cancelled")
                    finished.append(seq)
                    continue
                new.append(seq)
                room -= 1
            return new

    def _step(self) -> list[Sequence]:
        model, eos = self.holder.model, self.holder.eos_ids
        finished: list[Sequence] = []
        new = self._admit(finished)
        if new:
            finished += self.batch.prefill(model, new, eos)
            self.peak_batch = max(self.peak_batch, len(self.batch.rows) + len(finished))
        if self.batch.rows:
            finished += self.batch.decode(model, eos)
            self.steps += 1
        return finished
