"""The embedded inference engine: continuous batching with mixed LoRA adapters, in its own thread.

One base model (fp32 on CPU, transformers) is held in memory; LoRA adapters are PEFT weights
injected into it. The engine thread runs iterations: it applies pending commands (adapter load and
unload), admits waiting requests into free KV-cache slots (prefilling each prompt once, then
copying the cache to the other slots when `n > 1`), and runs one decode step for every running
sequence together, whatever adapter each uses (PEFT's `adapter_names` routes each row through its
own adapter, `__base__` through none). Prompts that arrive together are prefilled together
(left-padded, up to `max_prefill_batch` prompts and `max_prefill_tokens` padded tokens: short
prompts are memory-bound and gain from sharing a pass, long ones are compute-bound and would only
delay each other's first tokens). Finished sequences leave the batch at once, new ones join
at the next iteration.

The KV cache is a preallocated tensor per layer, `[slots, kv_heads, max_model_len, head_dim]`,
read and written by the attention function of `sovllm.serve.attention`.

Failures stay with the requests they belong to: token ids are checked at `submit`; a forward pass
that raises is retried row by row (a batch, then each request alone), and only the rows that fail
again are answered with an error; a sampling error ends only its own sequence. Every failed or
aborted request is answered and its slots are freed. `health()` reports a dead engine thread or
one that has made no progress for `stall_seconds` while it had work.

Automatic prefix caching (on by default, as in vLLM): a slot keeps the prompt whose keys and values
it holds, also after its sequence finished, until the slot is given to another request. A new
request looks for the slot (same adapter) whose prompt shares the longest prefix with its own,
copies the prefix's keys and values from it into an empty or the least recently used free slot (or
takes that slot as it is when it is free and the new prompt extends its whole prompt), and
prefills only the rest. A request that shares most of its prompt with one admitted in the same
iteration waits one iteration, so the shared part is computed once. Free slots are handed out least
recently used first, which keeps recent prompts available longest. Loading or unloading an adapter
forgets its cached prompts.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from sovllm.errors import AdapterError, BackendError, InputError
from sovllm.models.lora_check import lora_config, read_adapter
from sovllm.serve.attention import ATTENTION, Batch, SlotSpan, register_attention
from sovllm.serve.sampling import Detokenizer, SamplingParams, Sequence, sample_next

log = logging.getLogger("sovllm.engine")
BASE = "__base__"
MIN_PREFIX = 16  # shorter shared prefixes are recomputed: not worth a copy (vLLM's block size)
# a decode step attends over the range of its slots at once when the range is at most this many
# times the number of rows (idle slots in the range are computed and discarded), else row by row
SPAN_DENSITY = 2


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists (binary search over C-level slice compares)."""
    hi = min(len(a), len(b))
    if hi == 0 or a[0] != b[0]:
        return 0
    if a[:hi] == b[:hi]:
        return hi
    lo = 1  # a[:lo] == b[:lo] holds, a[:hi] == b[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class Request:
    """A generation request as the engine sees it; `emit` receives events from the engine thread."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    emit: Callable[[dict], None]
    grammar: Any = None  # a compiled grammar (structured output) or None
    arrival: float = field(default_factory=time.monotonic)
    refusal_bias: float | None = None  # the adapter's calibrated refusal bias for this request (None: none)
    gone: bool = False  # its receiver failed: aborted, reported once


class EngineDeadError(BackendError):
    """The engine thread has ended: nothing submitted now would ever run."""


class Engine:
    """Continuous-batching generator over one base model and any number of LoRA adapters."""

    def __init__(self, model_dir, tokenizer, *, max_num_seqs: int = 16, max_model_len: int = 2048,
                 threads: int | None = None, max_prefill_batch: int = 8, max_prefill_tokens: int = 512,
                 metrics=None, prefix_caching: bool = True, min_prefix: int = MIN_PREFIX,
                 stall_seconds: float = 120.0):
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        register_attention()
        self.tokenizer = tokenizer
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model.set_attn_implementation(ATTENTION)
        self.model.eval()
        config = self.model.config
        self.max_model_len = min(max_model_len, getattr(config, "max_position_embeddings", max_model_len))
        self.max_num_seqs = max_num_seqs
        self.max_prefill_batch = max_prefill_batch
        self.max_prefill_tokens = max_prefill_tokens
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (config.num_hidden_layers, max_num_seqs, config.num_key_value_heads, self.max_model_len, head_dim)
        # uninitialised: attention only reads positions a prefill, decode step or prefix copy wrote, and
        # the operating system maps pages only when first written, so memory follows the contexts in use
        self.keys = torch.empty(shape, dtype=torch.float32)
        self.values = torch.empty(shape, dtype=torch.float32)
        self.vocab_size = config.vocab_size
        # (in, out) features of every linear module: what an adapter's lora_A / lora_B must fit
        self.linear_shapes = {name: (m.in_features, m.out_features) for name, m in self.model.named_modules()
                              if isinstance(m, torch.nn.Linear)}
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.stop_ids.add(tokenizer.eos_token_id)
        self.peft = None  # the PeftModel wrapper once an adapter is loaded
        self._lora_enabled: bool | None = None  # state of its LoRA layers (None: as PEFT left them)
        self.adapters: set[str] = set()
        self._refusal: dict = {}  # adapter → its RefusalCalibration (sovllm.models.adapter)
        self._free = list(range(max_num_seqs))  # least recently used first
        self.prefix_caching = prefix_caching
        self.min_prefix = max(1, min_prefix)
        # per slot: (adapter, prompt ids) whose keys and values the slot holds, or None
        self._resident: list[tuple[str | None, list[int]] | None] = [None] * max_num_seqs
        # per slot: positions [0, n) of `values` hold finite numbers (as do those below a running
        # sequence's length); raised when a decode step zeroes what its span mask hides
        self._finite = [0] * max_num_seqs
        self._waiting: queue.Queue = queue.Queue()
        self._commands: queue.Queue = queue.Queue()
        self._pending: list[Request] = []
        self._running: list[Sequence] = []
        self._aborted: set[str] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat = time.monotonic()  # when the engine thread last finished an iteration or idled
        self.stall_seconds = stall_seconds
        self.step = 0  # decode iterations so far (sequences record the steps they join and leave)
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "requests": 0, "cached_prompt_tokens": 0}
        self.metrics = metrics  # serve.metrics.Metrics or None: told of every prompt, token and finish
        if metrics is not None:
            metrics.attach(self)

    # --- public API (any thread) ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sovllm-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30) -> None:
        """Stop the engine thread; every request still queued or running is answered (aborted)."""
        self._stop.set()
        self._wake.set()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout)

    def submit(self, request: Request) -> None:
        """Queue a request (checked by `validate` first); EngineDeadError when the engine thread is not running."""
        self.validate(request.prompt_ids, request.params, request.adapter)
        if not self.alive:
            raise EngineDeadError("the inference engine is not running; the server must be restarted")
        self._waiting.put(request)
        self._wake.set()

    def validate(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None) -> None:
        """InputError when a request cannot fit the context window or names token ids outside the vocabulary,
        AdapterError when its adapter is not loaded."""
        total = len(prompt_ids) + params.max_tokens
        if not prompt_ids:
            raise InputError("the prompt is empty")
        self._check_ids(prompt_ids, "prompt")
        self._check_ids(params.stop_token_ids, "stop_token_ids")
        if total > self.max_model_len:
            raise InputError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({len(prompt_ids)} in the messages, {params.max_tokens} in the "
                f"completion). Please reduce the length of the messages or completion.")
        if params.n > self.max_num_seqs:
            raise InputError(f"n={params.n} exceeds the server's --max-num-seqs {self.max_num_seqs}")
        if adapter is not None and adapter not in self.adapters:
            raise AdapterError(f"adapter {adapter!r} is not loaded")

    def _check_ids(self, ids: list[int], what: str) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(t for t in ids if not 0 <= t < self.vocab_size)
            raise InputError(f"{what}: token id {bad} is out of vocabulary (valid ids: 0 to {self.vocab_size - 1})")

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running (False before `start` and after it ended)."""
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def health(self) -> str | None:
        """None when healthy; else why not (thread gone, or no progress while there is work)."""
        if self._thread is None or not self._thread.is_alive():
            return "the engine thread is not running"
        idle_for = time.monotonic() - self.heartbeat
        if self.busy and idle_for > self.stall_seconds:
            return f"the engine has made no progress for {idle_for:.0f} s with {self.busy} requests in it"
        return None

    def abort(self, request_id: str) -> None:
        """Stop a request (client went away); its slots are freed at the next iteration."""
        self._aborted.add(request_id)
        self._wake.set()

    def abort_all(self, error: str, status: int = 503) -> None:
        """Answer every queued and running request with `error` at the next iteration (shutdown)."""
        self._commands.put((lambda: self._fail_all(error, status), Future()))
        self._wake.set()

    def call(self, fn: Callable[[], Any], timeout: float = 600) -> Any:
        """Run `fn` on the engine thread between iterations (model changes) and return its result."""
        future: Future = Future()
        self._commands.put((fn, future))
        self._wake.set()
        return future.result(timeout=timeout)

    def load_adapter(self, name: str, path, refusal=None) -> None:
        """Load (or replace) adapter `name`; `refusal` is its RefusalCalibration, applied while decoding for it.

        The files are read and checked in the calling thread (`sovllm.models.lora_check`: allowed config
        fields, tensor names, shapes and values); the engine thread pauses generation only to add the
        LoRA layers and copy the checked weights in (docs/serve.md gives the measured pause)."""
        from pathlib import Path


        config, state = read_adapter(Path(path), self.linear_shapes)
        self.call(lambda: self._load_adapter(name, config, state, refusal))

    def unload_adapter(self, name: str) -> None:
        self.call(lambda: self._unload_adapter(name))

    @property
    def busy(self) -> int:
        return len(self._running) + len(self._pending) + self._waiting.qsize()

    @property
    def waiting(self) -> int:
        """Requests queued for a KV-cache slot."""
        return len(self._pending) + self._waiting.qsize()

    def load(self) -> dict:
        """A snapshot for the metrics (read from another thread: copies, never the live lists)."""
        running, pending = list(self._running), list(self._pending)
        queued = list(self._waiting.queue)
        return {"running": len({s.request.id for s in running}), "waiting": len(pending) + len(queued),
                "slots_used": self.max_num_seqs - len(self._free), "slots": self.max_num_seqs,
                "running_adapters": sorted({s.request.adapter for s in running if s.request.adapter}),
                "waiting_adapters": sorted({r.adapter for r in pending + queued if r.adapter})}

    # --- engine thread ----------------------------------------------------------------------------

    def _load_adapter(self, name: str, config: dict, state: dict, refusal=None) -> None:
        from peft import PeftModel, set_peft_model_state_dict


        if name in self.adapters:
            self._unload_adapter(name)
        if self.peft is not None:
            self._lora_layers(True)  # new layers come enabled: keep all of them in one state
        lora = lora_config(config)
        if self.peft is None:
            self.peft = PeftModel(self.model, lora, adapter_name=name)
            self.peft.eval()
        else:
            self.peft.add_adapter(name, lora)
        self.adapters.add(name)
        try:
            result = set_peft_model_state_dict(self.peft, state, adapter_name=name)
            if result.unexpected_keys:
                raise AdapterError(f"adapter {name!r}: weights for modules it does not target: "
                                   f"{result.unexpected_keys[0]}")
            missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
            if missing:
                raise AdapterError(f"adapter {name!r}: no weights for {missing[0]}")
        except Exception:
            self._unload_adapter(name)
            raise
        self.peft.requires_grad_(False)
        self._refusal.pop(name, None)
        if refusal is not None:
            self._refusal[name] = refusal
        self._forget(name)

    def _unload_adapter(self, name: str) -> None:
        if any(s.request.adapter == name for s in self._running) or any(r.adapter == name for r in self._pending):
            raise AdapterError(f"adapter {name!r} is in use by running requests; retry when they finish")
        self.adapters.discard(name)
        self._refusal.pop(name, None)
        self._forget(name)
        if self.adapters:
            self.peft.delete_adapter(name)
        else:  # the last one: take the LoRA layers out again, back to the plain base model
            self.model = self.peft.unload()
            self.peft = None
            self._lora_enabled = None

    def _loop(self) -> None:
        import torch

        try:
            with torch.inference_mode():
                while not self._stop.is_set():
                    try:
                        self._iteration()
                    except Exception as exc:  # noqa: BLE001 - a bug outside the isolated steps: fail what is in flight
                        log.exception("engine iteration failed")
                        self._fail_all(f"engine error: {type(exc).__name__}: {exc}", 500)
                    self.heartbeat = time.monotonic()
                    if not self._running and not self._pending and self._waiting.empty() and self._commands.empty():
                        self._wake.wait(timeout=1.0)
                        self._wake.clear()
                        self.heartbeat = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - the thread ends here: nobody may wait forever
            log.exception("engine thread died")
            self._fail_all(f"engine stopped: {type(exc).__name__}", 503)
        finally:
            self._stop.set()
            self._fail_all("the server is shutting down; the request was aborted", 503)

    def _fail_all(self, error: str, status: int) -> None:
        """Answer every queued, pending and running request with `error` and free their slots."""
        while not self._waiting.empty():
            self._pending.append(self._waiting.get())
        while not self._commands.empty():
            _, future = self._commands.get()
            future.set_exception(EngineDeadError(error))
        pending, self._pending = self._pending, []
        for request in pending:
            self._fail_request(request, error, status)
        for seq in list(self._running):
            self._finish(seq, "error", error=error, status=status)

    def _fail_request(self, request: Request, error: str, status: int = 500) -> None:
        """Answer a request that holds no running sequence (never admitted, or its prefill failed)."""
        if self.metrics is not None:
            self.metrics.finished(request.adapter, "error", time.monotonic() - request.arrival)
        for index in range(request.params.n):
            self._emit(request, {"index": index, "token": None, "text": "", "logprobs": None,
                                 "finish_reason": "error", "error": error, "status": status, "step": self.step})

    def _emit(self, request: Request, event: dict) -> None:
        """Hand an event to the request's receiver; a receiver that fails (its event loop closed, say)
        is treated as a client that went away, never as an engine failure."""
        try:
            request.emit(event)
        except Exception:  # noqa: BLE001
            if not request.gone:
                log.warning("request %s: its receiver failed; aborting it", request.id, exc_info=True)
                request.gone = True
            self._aborted.add(request.id)

    def _iteration(self) -> None:
        # queued requests first: an adapter unload (a command) must see those that name the adapter
        while not self._waiting.empty():
            self._pending.append(self._waiting.get())
        while not self._commands.empty():
            fn, future = self._commands.get()
            try:
                future.set_result(fn())
            except Exception as exc:  # noqa: BLE001 - returned to the caller
                future.set_exception(exc)
        while not self._waiting.empty():
            self._pending.append(self._waiting.get())
        self._drop_aborted()
        admitted, plans = [], []
        avail = list(self._free)  # free slots not yet given to a request of this iteration (LRU first)
        taken: set[int] = set()   # slots given out now: their cached prompts are no source any more
        sources: set[int] = set()  # slots a request copies a prefix from: never a destination now
        while self._pending and avail and len(admitted) < self.max_prefill_batch:
            request = self._pending[0]
            if request.adapter is not None and request.adapter not in self.adapters:
                # unloaded between `validate` and now: never answer it with the base model instead
                self._fail_request(self._pending.pop(0), f"The model `{request.adapter}` does not exist "
                                   "(its adapter was unloaded before the request started).", 404)
                continue
            source, cached = self._lookup(request, taken)
            if admitted:
                if self.prefix_caching and any(self._worth_waiting(request, r, cached) for r in admitted):
                    break  # shares much with a prompt prefilled now: reuse it from the next iteration
                suffixes = [len(r.prompt_ids) - c for r, (_, c, _) in zip(admitted, plans)]
                suffix = len(request.prompt_ids) - cached
                width = max(*suffixes, suffix)
                if width * (len(admitted) + 1) > self.max_prefill_tokens:
                    break  # long prompts are compute-bound: batching them only delays first tokens
                if not 0.5 <= suffix / suffixes[0] <= 2:
                    break  # very different lengths would mostly pad: prefill it in the next iteration
            group = self._assign(request, source, cached, avail, sources)
            if group is None:
                break  # not enough slots now
            taken.update(group)
            if source is not None and source != group[0]:
                sources.add(source)
            plans.append((source, cached, group))
            admitted.append(self._pending.pop(0))
        if admitted:
            self._prefill_isolated(admitted, plans)
        if self._running:
            self._decode()

    def _drop_aborted(self) -> None:
        if not self._aborted:
            return
        aborted, self._aborted = self._aborted, set()
        if self.metrics is not None:
            for request in self._pending:
                if request.id in aborted:
                    self.metrics.finished(request.adapter, "abort", time.monotonic() - request.arrival)
        self._pending = [r for r in self._pending if r.id not in aborted]
        for seq in [s for s in self._running if s.request.id in aborted]:
            self._finish(seq, "abort")

    def _lora_layers(self, enabled: bool) -> None:
        """Switch the LoRA layers on or off (off: a base-only batch skips them, ~20% faster here)."""
        if self._lora_enabled is not enabled:
            if enabled:
                self.peft.base_model.enable_adapter_layers()
            else:
                self.peft.base_model.disable_adapter_layers()
            self._lora_enabled = enabled

    def _forward(self, input_ids, positions, batch: Batch, adapters: list[str | None]):
        kwargs = {}
        model = self.model
        if self.peft is not None:
            model = self.peft
            if any(adapters):
                self._lora_layers(True)
                kwargs["adapter_names"] = [a or BASE for a in adapters]
            else:
                self._lora_layers(False)
        out = model(input_ids=input_ids, position_ids=positions, use_cache=False, logits_to_keep=1,
                    sovllm_batch=batch, **kwargs)
        return out.logits[:, -1, :].float()

    def _lookup(self, request: Request, taken: set[int]) -> tuple[int | None, int]:
        """The slot holding the longest cached prefix of the request's prompt, and that prefix's length.

        At least one prompt token is always left to prefill (its logits give the first token);
        prefixes shorter than `min_prefix` do not count. Slots in `taken` (given to requests admitted
        in this iteration, which will overwrite them) are skipped.
        """
        if not self.prefix_caching:
            return None, 0
        best, best_len = None, 0
        limit = len(request.prompt_ids) - 1
        for slot, resident in enumerate(self._resident):
            if resident is None or resident[0] != request.adapter or slot in taken:
                continue
            n = min(common_prefix(request.prompt_ids, resident[1]), limit)
            if n > best_len or (n == best_len and n and slot in self._free):
                best, best_len = slot, n
        if best_len < self.min_prefix:
            return None, 0
        return best, best_len

    def _worth_waiting(self, request: Request, admitted: Request, cached: int) -> bool:
        """Whether `request` should wait for `admitted`'s prefill to reuse the prefix they share.

        Waiting costs a forward pass of its own later; it pays when the shared part not cached yet is
        at least as long as what would remain to compute (a long context or few-shot head, not just a
        chat template's first line).
        """
        if admitted.adapter != request.adapter:
            return False
        shared = min(common_prefix(request.prompt_ids, admitted.prompt_ids), len(request.prompt_ids) - 1)
        return shared - cached >= max(self.min_prefix, len(request.prompt_ids) - shared)

    def _forget(self, adapter: str) -> None:
        """Drop the cached prompts computed with `adapter` (its weights changed or are gone)."""
        self._resident = [None if r is not None and r[0] == adapter else r for r in self._resident]

    def _assign(self, request: Request, source: int | None, cached: int, avail: list[int],
                sources: set[int]) -> list[int] | None:
        """KV-cache slots for the request's sequences (None when too few are free), taken from `avail`.

        The first slot receives the cached prefix: copied into an empty free slot if there is one;
        else, when the source slot is free and the new prompt extends its whole cached prompt, the
        source itself; else copied into the least recently used other free slot (its prompt is
        evicted, as vLLM evicts its least recently used blocks); the source itself only when no
        other slot is free. A slot another request copies from in this iteration is never a
        destination (copies happen before the forward pass, the only thing that writes a source slot).
        """
        n = request.params.n
        usable = [slot for slot in avail if slot not in sources]
        usable.sort(key=lambda slot: self._resident[slot] is not None)  # empty first, then LRU (stable)
        others = [slot for slot in usable if slot != source]
        source_free = source is not None and source in avail
        if source_free and (not others or (self._resident[others[0]] is not None
                                            and cached >= len(self._resident[source][1]) - 1)):
            first = source
        elif others:
            first = others[0]
        else:
            return None
        rest = [slot for slot in usable if slot not in (first, source)]
        if source in usable and source != first:
            # its own source last: the prefix is copied out before the forward pass, and `n` up to
            # every slot there is must still fit, or the request would wait forever with all slots free
            rest.append(source)
        rest = rest[:n - 1]
        if len(rest) < n - 1:
            return None
        group = [first, *rest]
        for slot in group:
            avail.remove(slot)
        return group

    def _copy_prefix(self, source: int, dest: int, length: int) -> None:
        """Copy the keys and values of the first `length` positions of slot `source` into slot `dest`."""
        self.keys[:, dest, :, :length] = self.keys[:, source, :, :length]
        self.values[:, dest, :, :length] = self.values[:, source, :, :length]

    def _prefill_isolated(self, requests: list[Request], plans: list) -> None:
        """Prefill together; if the pass fails, each request alone, and fail only those that fail again."""
        try:
            self._prefill(requests, plans)
            return
        except Exception as exc:  # noqa: BLE001
            if len(requests) == 1:
                self._prefill_failed(requests[0], exc)
                return
            log.warning("batched prefill of %d requests failed (%s: %s); retrying each alone", len(requests),
                        type(exc).__name__, exc)
        for request, plan in zip(requests, plans):
            try:
                self._prefill([request], [plan])
            except Exception as exc:  # noqa: BLE001
                self._prefill_failed(request, exc)

    def _prefill_failed(self, request: Request, exc: Exception) -> None:
        log.error("request %s: prefill failed: %s: %s", request.id, type(exc).__name__, exc)
        self._fail_request(request, f"engine error: {type(exc).__name__}: {exc}")

    def _prefill(self, requests: list[Request], plans: list[tuple[int | None, int, list[int]]]) -> None:
        """Prefill several prompts in one forward pass (left-padded), then start their sequences.

        Each prompt starts after its cached prefix (`plans`: source slot, cached length and the
        request's slots, from `_assign`). On a CPU a forward pass costs about the same for one short
        prompt as for several: the time goes into reading the weights. Batching the prefills of
        requests that arrived together saves those passes. If the forward pass raises, the slots are
        free again and nothing was started (the caller retries or fails the requests).
        """
        import torch

        cached = [c for _, c, _ in plans]
        slots = [group for _, _, group in plans]
        for group in slots:
            for slot in group:
                self._resident[slot] = None  # overwritten from here on
        for source, c, group in plans:  # all copies before the forward pass writes any slot
            if source is not None and source != group[0]:
                self._copy_prefix(source, group[0], c)
        suffixes = [r.prompt_ids[c:] for r, c in zip(requests, cached)]
        width = max(len(x) for x in suffixes)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in suffixes])
        positions = torch.tensor([[0] * (width - len(x)) + list(range(c, c + len(x)))
                                  for x, c in zip(suffixes, cached)])
        batch = Batch(self.keys, self.values, [s[0] for s in slots], cached, [len(x) for x in suffixes],
                      [width - len(x) for x in suffixes])
        logits = self._forward(input_ids, positions, batch, [r.adapter for r in requests])
        for group in slots:
            for slot in group:
                self._free.remove(slot)
        for row, (request, group) in enumerate(zip(requests, slots)):
            n_prompt = len(request.prompt_ids)
            for slot in group[1:]:  # n > 1: share the prompt's cache instead of recomputing it
                self._copy_prefix(group[0], slot, n_prompt)
            if self.prefix_caching:
                for slot in group:
                    self._resident[slot] = (request.adapter, request.prompt_ids)
            self.stats["prompt_tokens"] += n_prompt
            self.stats["cached_prompt_tokens"] += cached[row]
            self.stats["requests"] += 1
            if self.metrics is not None:
                self.metrics.prompt(request.adapter, n_prompt, cached[row] if self.prefix_caching else None)
            for index, slot in enumerate(group):
                seq = Sequence(request=request, index=index, slot=slot, length=n_prompt, joined_step=self.step,
                               detok=Detokenizer(self.tokenizer, request.params.stop))
                self._running.append(seq)
                try:
                    seq.setup(self.vocab_size)
                    self._accept(seq, logits[row])
                except Exception as exc:  # noqa: BLE001 - this sequence's own failure (sampling, grammar)
                    self._sequence_failed(seq, exc)

    def _sequence_failed(self, seq: Sequence, exc: Exception) -> None:
        log.error("request %s: sequence %d failed: %s: %s", seq.request.id, seq.index, type(exc).__name__, exc)
        self._finish(seq, "error", error=f"engine error: {type(exc).__name__}: {exc}")

    def _decode(self) -> None:
        """One decode step for every running sequence; if the batched pass fails, each row alone."""
        running = list(self._running)
        try:
            logits = self._decode_rows(running)
        except Exception as exc:  # noqa: BLE001
            if len(running) == 1:
                self._sequence_failed(running[0], exc)
                return
            log.warning("batched decode of %d rows failed (%s: %s); retrying each alone", len(running),
                        type(exc).__name__, exc)
            rows = []
            for seq in running:
                try:
                    rows.append((seq, self._decode_rows([seq])[0]))
                except Exception as exc:  # noqa: BLE001
                    self._sequence_failed(seq, exc)
        else:
            rows = list(zip(running, logits))
        self.step += 1
        for seq, row_logits in rows:
            seq.length += 1
            try:
                self._accept(seq, row_logits)
            except Exception as exc:  # noqa: BLE001
                self._sequence_failed(seq, exc)

    def _decode_rows(self, running: list[Sequence]):
        """Logits of one decode step for `running` (each writes its new key and value at its length)."""
        import torch

        slots, lengths = [s.slot for s in running], [s.length for s in running]
        batch = Batch(self.keys, self.values, slots, lengths, [1] * len(running))
        if len(running) > 1 and max(slots) - min(slots) < SPAN_DENSITY * len(running):
            batch.span = SlotSpan.build(slots, lengths)
            for slot, length in zip(slots, lengths):  # values under the mask must be finite (0 × NaN = NaN)
                done = max(self._finite[slot], length + 1)
                if done < batch.span.width:
                    self.values[:, slot, :, done:batch.span.width] = 0
                self._finite[slot] = max(done, batch.span.width)
        input_ids = torch.tensor([[s.last_token] for s in running])
        positions = torch.tensor([[s.length] for s in running])
        return self._forward(input_ids, positions, batch, [s.request.adapter for s in running])

    def _accept(self, seq: Sequence, logits) -> None:
        """Sample the next token of `seq` from its logits, emit it, and finish the sequence if done."""
        token, logprobs = sample_next(seq, logits, self.stop_ids, self._refusal.get(seq.request.adapter))
        seq.tokens.append(token)
        seq.last_token = token
        self.stats["generation_tokens"] += 1
        if self.metrics is not None:
            now = time.monotonic()
            first = len(seq.tokens) == 1
            if seq.index == 0 or not first:  # time to first token counts once per request
                self.metrics.token(seq.request.adapter, first, now - (seq.request.arrival if first else seq.last_at))
            seq.last_at = now
        params = seq.request.params
        finish = None
        # as in vLLM, ignore_eos ignores the model's end tokens only; stop_token_ids the client named still stop
        is_stop_token = (token in self.stop_ids and not params.ignore_eos) or token in params.stop_token_ids
        if is_stop_token and len(seq.tokens) > params.min_tokens:
            finish = "stop"
            delta = seq.detok.finish()
        else:
            delta = seq.detok.add(token)
            if seq.detok.stopped and len(seq.tokens) >= params.min_tokens:
                finish, delta = "stop", delta + seq.detok.finish()
            elif seq.matcher is not None and seq.matcher.is_terminated():
                finish, delta = "stop", delta + seq.detok.finish()
            elif len(seq.tokens) >= params.max_tokens:
                finish, delta = "length", delta + seq.detok.finish()
            elif seq.length + 1 >= self.max_model_len:
                finish, delta = "length", delta + seq.detok.finish()
        event = {"index": seq.index, "token": token, "text": delta, "logprobs": logprobs,
                 "finish_reason": finish, "step": self.step}
        if finish:
            self._finish(seq, finish, event=event)  # counted in the metrics before the client hears of it
        else:
            self._emit(seq.request, event)

    def _finish(self, seq: Sequence, reason: str, *, event: dict | None = None, error: str | None = None,
                status: int = 500) -> None:
        """End a sequence: free its slot, record it, then send `event` (or a closing event of its own).

        The metrics are updated before the client is told, so a scrape right after a response sees it."""
        if seq.finished_step is not None:
            return  # already finished: its slot is free once, never twice
        if seq in self._running:
            self._running.remove(seq)
        self._free.append(seq.slot)
        seq.finished_step = self.step
        if self.metrics is not None and seq.index == 0:
            self.metrics.finished(seq.request.adapter, reason, time.monotonic() - seq.request.arrival)
        if event is None:
            event = {"index": seq.index, "token": None, "text": "", "logprobs": None, "finish_reason": reason,
                     "error": error, "status": status, "step": self.step}
        self._emit(seq.request, event)


_ids = itertools.count()


def next_request_id(prefix: str) -> str:
    return f"{prefix}-{int(time.time() * 1000):x}{next(_ids):04x}"

