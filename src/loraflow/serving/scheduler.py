"""One generation loop for every request, whatever adapter it asks for.

Requests become `Sequence`s and wait in a queue; a single thread runs steps. Each step, under the
model lock (swap work goes between steps, see serving.model):

1. waiting sequences are admitted while the batch has room (`max_batch`): their prompts are run
   together in one forward (left-padded), which yields their first token and their KV cache;
2. that cache is written into free rows of the batch's preallocated cache buffers;
3. one decode forward runs every row of the batch, one token each, each row with its own adapter
   (PEFT's mixed-adapter batches, `adapter_names=[...]`), writing one column of the buffers in place;
4. rows that finished (max_tokens, an end token, a stop string) leave the batch.

So requests join and leave at step granularity (continuous batching). Why this design on a CPU:
a decode step of one row reads every weight once for a single token and is bound by memory
bandwidth, so batching rows costs little more than one; a paged KV cache (vLLM) saves memory
at the price of custom attention kernels, which torch's CPU build does not have. Here the batch
keeps one buffer per layer with a row per sequence (`Batch`): no step copies a running row's
cache (transformers' DynamicCache concatenates the whole cache into a new tensor every step, and
merging joiners into it copied every row again). A row's output equals its output alone because
the columns that are not its tokens are masked out of attention and its positions count only
its own tokens (`position_ids` from the attention mask), as in `generate` with left padding.

`max_batch=1` admits a sequence only when the batch is empty: one request at a time, the
behaviour of the service before this scheduler (kept for comparison, `loraflow serve --max-batch 1`).
"""

from __future__ import annotations

import collections
import functools
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


def forward(model, *, adapter_names: list[str], **inputs):
    """Every forward of generation goes through here (one place for precision contexts): row i
    through adapter `adapter_names[i]`, all of them in one product per layer (serving.row_adapters)
    where it covers them, else PEFT's mixed-adapter batch."""
    import torch

    from loraflow.modeling import autocast, precision_of
    from loraflow.serving import row_adapters

    with torch.inference_mode(), autocast(precision_of(model)):
        out = row_adapters.forward(model, adapter_names, inputs)
        return out if out is not None else model(adapter_names=adapter_names, **inputs)


class _Cache:
    """transformers' KV cache for this model: its keyword (`cache` from transformers 5.24,
    `past_key_values` before) and the per-layer (key, value) tensors of an output."""

    def __init__(self, model) -> None:
        params = inspect.signature(model.get_base_model().forward).parameters
        self.kwarg = "cache" if "cache" in params else "past_key_values"

    def tensors(self, output) -> list[list]:
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        return [[layer.keys, layer.values] for layer in cache.layers]


@functools.cache
def _slot_layer_class():
    """A transformers cache layer over the batch's preallocated buffers (defined on first use:
    transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        """One layer's keys and values in the batch's buffers: `update` writes the step's new column in
        place and hands attention a view of the columns in use, where DynamicLayer would torch.cat
        the whole cache into a new tensor every step."""

        def __init__(self, batch: Batch, index: int) -> None:
            super().__init__()
            self.batch, self.index, self.is_initialized = batch, index, True

        def view(self) -> None:
            """The columns written so far (what get_seq_length and the mask sizes read)."""
            b = self.batch
            self.keys = b._k[self.index][:len(b.rows), :, b.start:b.width]
            self.values = b._v[self.index][:len(b.rows), :, b.start:b.width]
            self.device = self.keys.device

        def update(self, key_states, value_states, *args, **kwargs):
            b, n, w = self.batch, len(self.batch.rows), self.batch.width
            q = key_states.shape[-2]
            b._k[self.index][:n, :, w:w + q] = key_states
            b._v[self.index][:n, :, w:w + q] = value_states
            self.keys = b._k[self.index][:n, :, b.start:w + q]
            self.values = b._v[self.index][:n, :, b.start:w + q]
            return self.keys, self.values

    return SlotLayer


class Batch:
    """Rows being generated together: their sequences and their KV cache, held in preallocated
    buffers (per layer, keys and values of rows x heads x columns x head_dim, and a mask of rows x
    columns) that steps write into in place. Row i of the buffers is `rows[i]`. A decode step writes
    column `width` of every row; a joiner's prompt goes into a free row, its last column at
    `width - 1` (or from column 0 when it is longer than `width`: the running rows then have masked
    columns up to it); a finished row is replaced by the last row (one row copied). Columns no
    row uses any more are skipped (`start`); when the columns run out, every row's columns are
    packed to the left into larger buffers (one copy, every ~`width` steps). So a step copies no
    running row's cache. Invariant: a row's mask is 0 at every column that is not its own token.
    The caller holds the model lock."""

    def __init__(self, rows: int = 1) -> None:
        self.rows: list[Sequence] = []
        self.capacity_rows = rows  # grown if more join
        self._k: list | None = None
        self._v: list | None = None
        self._mask = None
        self._cache = None  # transformers Cache over the buffers
        self.start = self.width = 0

    def clear(self) -> list[Sequence]:
        rows, self.rows = self.rows, []
        self.start = self.width = 0
        if self._mask is not None:
            self._mask.zero_()
        return rows

    def _reserve(self, rows: int, columns: int, prompt: int = 0, like=None) -> None:
        """Room for `rows` rows and `columns` more columns past max(`width`, `prompt`); reallocates
        (packing every row's columns to the left) when there is none. `like`: a prefill's per-layer
        (keys, values), the shapes and dtype of a first allocation."""
        import torch

        if (self._mask is not None and rows <= self._mask.shape[0]
                and max(self.width, prompt) + columns <= self._mask.shape[1]):
            return
        n = len(self.rows)
        if self._mask is None:
            layers = [(k.shape[1:2] + k.shape[3:], v.shape[1:2] + v.shape[3:], k.dtype, k.device) for k, v in like]
            used, order = 0, None
        else:
            layers = [(k.shape[1:2] + k.shape[3:], v.shape[1:2] + v.shape[3:], k.dtype, k.device)
                      for k, v in zip(self._k, self._v)]
            mask = self._mask[:n, self.start:self.width]
            used = int(mask.sum(-1).max()) if n else 0
            # Each row's own columns, in order, right-aligned in `used` columns (stable sort: masked first).
            order = torch.sort(mask.to(torch.int8), dim=-1, stable=True).indices[:, mask.shape[1] - used:]
        self.capacity_rows = max(rows, self.capacity_rows, self._mask.shape[0] if self._mask is not None else 0)
        cols = max(used, prompt) + columns + max(64, used)  # geometric: packing is amortized over many steps
        device = layers[0][3]
        new_k = [torch.zeros((self.capacity_rows, hk[0], cols, hk[1]), dtype=dt, device=device) for hk, _, dt, _ in layers]
        new_v = [torch.zeros((self.capacity_rows, hv[0], cols, hv[1]), dtype=dt, device=device) for _, hv, dt, _ in layers]
        new_mask = torch.zeros((self.capacity_rows, cols), dtype=torch.bool, device=device)
        if order is not None and n and used:
            for old, new in ((self._k, new_k), (self._v, new_v)):
                for o, nw in zip(old, new):
                    idx = order[:, None, :, None].expand(n, o.shape[1], used, o.shape[3])
                    nw[:n, :, :used] = o[:n, :, self.start:self.width].gather(2, idx)
            new_mask[:n, :used] = self._mask[:n, self.start:self.width].gather(1, order)
        self._k, self._v, self._mask = new_k, new_v, new_mask
        self.start, self.width = 0, used
        layer = _slot_layer_class()
        from transformers.cache_utils import Cache

        self._cache = Cache(layers=[layer(self, i) for i in range(len(layers))])

    def _restart(self) -> None:
        """`start`: the first column some row uses."""
        used = self._mask[:len(self.rows), :self.width].any(0).nonzero()
        self.start = int(used[0]) if len(used) else self.width

    def prefill(self, model, new: list[Sequence], eos: set[int]) -> list[Sequence]:
        """Run the new sequences' prompts (left-padded, one forward), take their first tokens and
        write their cache into free rows; returns the sequences that finished."""
        import torch

        width = max(len(seq.prompt_ids) for seq in new)
        pad = min(eos) if eos else 0  # any id: padded positions are masked out
        ids = torch.tensor([[pad] * (width - len(s.prompt_ids)) + s.prompt_ids for s in new], device=model.device)
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in new],
                            device=model.device)
        # The last position's logits only, named by index, not `logits_to_keep=1`: the int keeps a
        # strided view of the hidden states, on which torch's CPU linear falls back to a batched
        # matmul over a copy of the output head per row (16 rows of GPT-2: 1.2 GB copied, 3.2 s
        # of a 3.5 s prefill in bf16, bench/serve_profile.py); an index gives a contiguous tensor.
        out = forward(model, input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                      adapter_names=[s.entry.slot for s in new], use_cache=True,
                      logits_to_keep=torch.tensor([width - 1], device=model.device))
        kv = _Cache(model).tensors(out)
        tokens = _sample(out.logits[:, -1], new)
        done = [seq._push(t, eos) or seq.cancelled for seq, t in zip(new, tokens)]
        n, j = len(self.rows), len(new)
        self._reserve(n + j, 1, prompt=width, like=kv)
        first = max(self.width - width, 0)
        for (k, v), bk, bv in zip(kv, self._k, self._v):
            bk[n:n + j, :, first:first + width] = k
            bv[n:n + j, :, first:first + width] = v
        self._mask[n:n + j] = False
        self._mask[n:n + j, first:first + width] = mask.bool()
        self.rows = [*self.rows, *new]
        self.width = max(self.width, width)
        self.start = min(self.start, first) if n else first
        return self._retire([False] * n + done)

    def decode(self, model, eos: set[int]) -> list[Sequence]:
        """One token for every row, each with its own adapter; returns the sequences that finished."""
        import torch

        n = len(self.rows)
        self._reserve(n, 1)
        for layer in self._cache.layers:
            layer.view()
        self._mask[:n, self.width] = True
        mask = self._mask[:n, self.start:self.width + 1]
        last = torch.tensor([[seq.generated[-1]] for seq in self.rows], device=self._mask.device)
        out = forward(model, input_ids=last, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                      adapter_names=[seq.entry.slot for seq in self.rows], use_cache=True,
                      **{_Cache(model).kwarg: self._cache})
        self.width += 1
        tokens = _sample(out.logits[:, -1], self.rows)
        return self._retire([seq._push(t, eos) or seq.cancelled for seq, t in zip(self.rows, tokens)])

    def _retire(self, done: list[bool]) -> list[Sequence]:
        """Finished rows leave: the last rows move into their places (their buffers rows copied)."""
        import torch

        if not any(done):
            return []
        finished = [seq for seq, d in zip(self.rows, done) if d]
        for seq in finished:
            if seq.finish_reason is None:  # cancelled by its consumer
                seq._finish("cancelled")
        keep = [i for i, d in enumerate(done) if not d]
        if not keep:
            self.clear()
            return finished
        n = len(keep)
        # Rows staying beyond the first n move into the holes the leaving rows left among the first n.
        src = [i for i in keep if i >= n]
        dst = [i for i in range(n) if done[i]]
        if src:
            s = torch.tensor(src, device=self._mask.device)
            d = torch.tensor(dst, device=self._mask.device)
            for buf in (*self._k, *self._v):
                cols = buf[:, :, self.start:self.width]
                cols.index_copy_(0, d, cols.index_select(0, s))
            self._mask.index_copy_(0, d, self._mask.index_select(0, s))
        by_row = dict(zip(dst, src))
        self.rows = [self.rows[by_row.get(i, i)] for i in range(n)]
        self._restart()
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
        self.batch = Batch(max_batch)
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
