"""``Engine``: serve an M+ / MemoryLLM model: ``memorize`` text into memory, ``generate`` from it.

The engine knows nothing of backend details (style.md): it drives a ``Runner`` by graph name
(docs/graphs.md) and keeps every memory state in a host ``HostMemory``. ``Engine`` is itself the
default ``Session``; ``engine.session()`` opens another independent memory over the same loaded
weights and backend objects.

Threads: every call on one session (``memorize``, ``generate``, ``generate_ids``, ``save_memory``,
``load_memory``, ``reset_memory``, ``seed``) holds that session's re-entrant lock, so concurrent calls on one
session run one after the other, each on the memory the previous one left; separate sessions run in
parallel (the runners' ``infer`` is thread-safe). The shared initial memory is built once, under the core's
lock. A streamed ``generate`` reads the memory (prefill) before it returns; its decode steps read only
their own cache.
"""
from __future__ import annotations

import functools
import itertools
import threading
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from mplus_deploy.model.rules import check_ltm, check_window, eos_ids
from mplus_deploy.model.sampling import SamplingParams

from . import snapshot
from mplus_deploy.artifact.source import Source, open_source
from .backends import GRAPHS, make_runner, pick_backend
from .batch import GRAPH as BATCH_GRAPH, batched_token_stream, for_engine
from .generate import token_stream
from mplus_deploy.util.machine import trim_heap

from .memorize import run_updates
from .memory import HostMemory
from .memory_convert import from_hidden
from .text import Piece, TextCodec, TextStream, check_ids, text_pieces

KEEP_INITIAL_BYTES = 1 << 30  # initial memories up to this size stay resident (cloned per session)
PROGRESS_MIN_CHUNKS = 8  # no progress bar for shorter inputs


class EngineClosed(RuntimeError):
    """A call on an ``Engine`` (or one of its sessions) after ``Engine.close()``."""


class _Core:
    """What sessions share: config, runner, tokenizer and the initial memory (K/V form, converted once)."""

    def __init__(self, source: Source, runner, codec: TextCodec):
        self.source, self.cfg, self.runner, self.codec = source, source.cfg, runner, codec
        self._initial: HostMemory | None = None
        self._handoff: HostMemory | None = None  # a large initial memory built by keeps_initial, for one session
        self._lock = threading.Lock()  # guards _initial (built once), _handoff and closed
        self.closed = False
        self.eos = set(eos_ids(self.cfg))
        self.batcher = None  # a batch.BatchDecoder when the engine batches decode steps across sessions
        self.overlap_memorize = True  # runtime.memorize: each update's bookkeeping overlaps the next chunk's graphs

    def project(self, rows: torch.Tensor):
        out = self.runner.infer("memory_project", {"rows": rows})
        return out.get("keys"), out["k"], out["v"]

    def _build_initial(self) -> HostMemory:
        m = from_hidden(self.cfg, self.source.initial_memory(), self.project)
        m.max_ltm_rows = self.source.max_ltm_rows
        trim_heap()  # the hidden rows and memory_project's transients are freed: hand their heap pages back (-48
        return m     # MiB of RSS on issue 16's bench, whose initial LTM is 64 MiB of hidden rows)

    def check_open(self, what: str) -> None:
        if self.closed:
            raise EngineClosed(f"{what}: this Engine is closed (Engine.close() or the end of its `with` block "
                               "released the backend); create a new Engine to use the model again")

    def _initial_locked(self) -> tuple[HostMemory, bool]:
        """(initial memory, whether it is the kept shared copy); the caller holds ``_lock``."""
        if self._initial is not None:
            return self._initial, True
        m = self._build_initial()
        if m.memory_bytes()["total"] <= KEEP_INITIAL_BYTES:
            self._initial = m
            return m, True
        return m, False

    def initial(self) -> HostMemory:
        """The initial memory in K/V form, built once and kept while it is small (``KEEP_INITIAL_BYTES``).
        The kept copy is shared: never write to it (``new_memory`` hands out clones)."""
        with self._lock:
            return self._initial_locked()[0]

    def keeps_initial(self) -> bool:
        """Build (and validate) the initial memory now; whether it is the kept shared copy. A large one is handed
        to the next ``new_memory`` call instead of being built again."""
        with self._lock:
            m, shared = self._initial_locked()
            if not shared:
                self._handoff = m
            return shared

    def new_memory(self, seed: int | None) -> HostMemory:
        """A session's own memory. A paper-scale initial memory (3 GiB for 2 mplus-8b-width layers with 150k
        LTM rows, ~50 GiB at 32 layers in fp32) is not kept beside the sessions: each new or reset session
        rebuilds it from the artifact (one memory_project pass) instead of cloning a resident copy. Built
        and cloned under the core's lock: concurrent sessions never build it twice nor see it half built."""
        with self._lock:
            m, self._handoff = self._handoff, None
            shared = False
            if m is None:
                m, shared = self._initial_locked()
            if shared:
                m = m.clone()
        if seed is not None:
            m.seed(seed)
        return m


def _serialized(fn):
    """Run the method under the session's re-entrant lock (one call at a time per session)."""
    @functools.wraps(fn)
    def call(self, *a, **k):
        with self._lock:
            return fn(self, *a, **k)
    return call


class Session:
    """One memory state over a shared model. Thread-safe: calls on one session are serialized by its
    (re-entrant) lock; separate sessions are independent and run concurrently."""

    def __init__(self, core: _Core, seed: int | None = None):
        self._lock = threading.RLock()
        self._core, self._seed = core, seed
        core.check_open("session")
        # a kept (small) initial memory is validated and converted now, and this session's own copy is made on first
        # use (an engine whose default session is never used holds no second copy); a paper-scale one is built
        # for this session at once (it is not kept, and converting it twice would cost a second memory_project pass)
        self._mem_value = None if core.keeps_initial() else core.new_memory(seed)

    @property
    def _mem(self) -> HostMemory:
        m = self._mem_value
        if m is None:
            with self._lock:
                if self._mem_value is None:
                    self._mem_value = self._core.new_memory(self._seed)
                m = self._mem_value
        return m

    @_mem.setter
    def _mem(self, value: HostMemory | None) -> None:
        self._mem_value = value

    # ------------------------------------------------------------------ facts
    @property
    def config(self):
        return self._core.cfg

    @property
    def memory(self) -> dict:
        """STM fill, LTM rows per layer, pending rows, update_step (and the memory version)."""
        with self._lock:
            return self._mem.stats()

    @property
    def host_memory(self) -> HostMemory:
        return self._mem

    # ------------------------------------------------------------------ memorize
    @_serialized
    def memorize(self, text_or_ids, chunk_size: int | None = 512, progress: bool = True) -> dict:
        """Inject ``text_or_ids`` into memory, one update per chunk of ``chunk_size`` tokens in document
        order (spec §3.1). ``chunk_size`` is capped at the model's ``max_chunk`` (the memory_update graph's
        range). Text is tokenized without special tokens. Returns the memory stats."""
        self._core.check_open("memorize")
        cfg = self._core.cfg
        if isinstance(text_or_ids, str):
            if not text_or_ids:
                raise ValueError("memorize: empty text")
            ids = check_ids(self._core.codec.encode_memory(text_or_ids), cfg.vocab_size, "memorize")
        else:
            ids = check_ids(text_or_ids, cfg.vocab_size, "memorize")
        C = cfg.max_chunk if chunk_size is None else int(chunk_size)
        if C <= 0:
            raise ValueError(f"memorize: chunk_size must be > 0, got {chunk_size}")
        C = min(C, cfg.max_chunk)
        starts = range(0, ids.numel(), C)
        bar = tqdm(starts, desc="memorize", unit="chunk", disable=not progress or len(starts) < PROGRESS_MIN_CHUNKS)
        run_updates(self._core, self._mem, (ids[s: s + C] for s in bar), overlap=self._core.overlap_memorize)
        return self.memory

    # ------------------------------------------------------------------ generate
    def _prompt_ids(self, prompt) -> torch.Tensor:
        cfg = self._core.cfg
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("generate: empty prompt")
            return check_ids(self._core.codec.encode_prompt(prompt), cfg.vocab_size, "generate")
        return check_ids(prompt, cfg.vocab_size, "generate")

    def _tokens(self, ids: torch.Tensor, sp: SamplingParams) -> Iterator[int]:
        cfg, max_prompt = self._core.cfg, self._core.source.max_prompt
        if max_prompt and ids.numel() > max_prompt:
            raise ValueError(f"the prompt is {ids.numel()} tokens; this artifact was exported with max_prompt={max_prompt} "
                             "(mplus-export --max-prompt): shorten it or memorize its front")
        check_window(cfg, ids.numel(), sp.max_new_tokens)
        if cfg.is_mplus:
            check_ltm(self._mem.state.ltm_rows)
        feeds = self._mem.prefill_feeds()
        if self._core.batcher is not None:
            return batched_token_stream(self._core.batcher, self._core.runner, feeds, ids, sp, self._core.eos)
        return token_stream(self._core.runner, cfg.prefix_len, feeds, ids, sp, self._core.eos)

    @_serialized
    def generate_ids(self, prompt_ids, max_new_tokens: int | None = None, *, params: SamplingParams | None = None,
                     **sampling) -> torch.Tensor:
        """New token ids only (eos included if hit), as ``MPlus.generate``; greedy by default. ``params``
        (``SamplingParams``) or keyword options (``do_sample, temperature, top_p, top_k, seed, stop_at_eos``);
        ``max_new_tokens`` defaults to 256."""
        self._core.check_open("generate_ids")
        ids = self._prompt_ids(prompt_ids)
        sp = SamplingParams.of(params, max_new_tokens, **sampling)
        return torch.tensor(list(self._tokens(ids, sp)), dtype=torch.int64)

    def generate(self, prompt, max_new_tokens: int | None = None, *, params: SamplingParams | None = None,
                 stop: list[str] | str | None = None, stream: bool = False, **sampling):
        """Text in, text out (or an iterator of text pieces with ``stream=True``). Generation stops at eos,
        at ``max_new_tokens`` (default 256), or at the first ``stop`` string (which is not included).
        ``params`` (``SamplingParams``) or keyword options (``do_sample, temperature, top_p, top_k, seed``).

        With ``stream=True`` the memory is read (prefill) before this returns, under the session's lock, so
        the stream answers from the memory as it was at the call; later steps touch only their own cache."""
        pieces = self.stream(prompt, max_new_tokens, params=params, stop=stop, **sampling)
        if not stream:
            return "".join(p.text for p in pieces)
        return (p.text for p in pieces if p.text)

    def stream(self, prompt, max_new_tokens: int | None = None, *, params: SamplingParams | None = None,
               stop: list[str] | str | None = None, **sampling) -> Iterator[Piece]:
        """``generate`` as ``text.Piece``s: each generated token with its text, then a final piece with the
        held-back tail and the ``finish_reason`` ("stop": eos or a stop string; "length"). ``prompt``: text or
        token ids. Prefill runs before this returns (under the session's lock), as ``generate(stream=True)``."""
        with self._lock:
            self._core.check_open("generate")
            ids = self._prompt_ids(prompt)
            sp = SamplingParams.of(params, max_new_tokens, **sampling)
            stop = [stop] if isinstance(stop, str) else list(stop or [])
            self._core.codec.require("generate")  # fail before any compute when there is no tokenizer
            toks = self._tokens(ids, sp)
            first = next(toks, None)  # runs prefill now
        head = iter(()) if first is None else iter((first,))
        eos = self._core.eos if sp.stop_at_eos else set()
        return text_pieces(self._checked(itertools.chain(head, toks)), TextStream(self._core.codec, stop), eos,
                           sp.max_new_tokens)

    def _checked(self, toks: Iterator[int]) -> Iterator[int]:
        """The tokens of a stream; a decode step after ``Engine.close()`` raises ``EngineClosed``."""
        for t in toks:
            yield t
            self._core.check_open("generate (stream)")

    # ------------------------------------------------------------------ memory state
    @_serialized
    def save_memory(self, path) -> Path:
        """Snapshot the whole memory (incl. the drop-RNG state) to one safetensors file, atomically."""
        return snapshot.save(self._mem, path, weights_id=self._core.source.weights_id)

    @_serialized
    def load_memory(self, path, keep_current_until_loaded: bool = False) -> dict:
        """Restore a snapshot written by ``save_memory`` for this model (else a clear ``SnapshotError``).

        The whole file is validated first (``snapshot.inspect``: header, metadata, every shape and dtype);
        a bad snapshot leaves this session's memory untouched. Then the current memory is released before
        the new one is read, so a paper-scale memory (~25 GiB in bf16 for mplus-8b) is never held twice;
        should reading still fail after validation (an I/O error), the session falls back to the initial
        memory. ``keep_current_until_loaded=True`` keeps the old memory until the new one is complete
        (twice the memory, never a fallback)."""
        cfg, src = self._core.cfg, self._core.source
        if keep_current_until_loaded:
            self._mem = snapshot.load(path, cfg, weights_id=src.weights_id, max_ltm_rows=src.max_ltm_rows)
            return self.memory
        snapshot.inspect(path, cfg, weights_id=src.weights_id)
        self._mem = None
        try:
            self._mem = snapshot.load(path, cfg, weights_id=src.weights_id, max_ltm_rows=src.max_ltm_rows)
        except BaseException:
            self._mem = self._core.new_memory(self._seed)
            raise
        return self.memory

    @_serialized
    def reset_memory(self) -> dict:
        """Back to the artifact's initial memory (and this session's seed, if it has one)."""
        self._core.check_open("reset_memory")
        self._mem = self._core.new_memory(self._seed)
        return self.memory

    @_serialized
    def seed(self, s: int) -> None:
        """Seed the drop generator (same contract as ``MPlus.memory.seed``, spec §9)."""
        self._seed = int(s)
        self._mem.seed(s)


class Engine(Session):
    """``Engine(path, backend="auto"|"onnxruntime"|"tensorrt"|"torch", device="cpu"|"cuda", threads=None, seed=None)``.

    ``path``: an exported artifact directory (manifest.json); for backend="torch" also a checkpoint
    directory, a preset name or an ``MPlus`` instance. ``seed`` seeds the drop generator exactly as
    ``MPlus.memory.seed`` does. ``tokenizer``: a HF tokenizer or a directory (default: the artifact's
    ``tokenizer/``, or the checkpoint's). Extra keyword options go to the backend runner (e.g. ``share_weights``
    for onnxruntime, ``engine_dir`` for tensorrt). ``wrap``: a callable ``runner → runner`` applied to the
    activated backend runner (a wrapper that is itself a ``Runner``, such as ``profiling.TimedRunner`` or
    ``runtime.backends.recording.RecordingRunner``); every graph call of the engine goes through it.
    ``max_batch`` > 1: decode steps of concurrent generations on any of the engine's sessions run as one
    ``decode_batch`` call of up to that many sequences (``runtime.batch``: continuous batching; same tokens).
    ``overlap_memorize`` (default True): ``memorize`` books each update's rows on a bookkeeping thread while the
    next chunk's graphs run (``runtime.memorize``; the same memory bit for bit); False runs them one after the other.
    """

    def __init__(self, path, backend: str = "auto", device: str = "cpu", threads: int | None = None,
                 seed: int | None = None, tokenizer=None, wrap=None, max_batch: int = 1,
                 overlap_memorize: bool = True, **backend_opts):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        source = open_source(path)
        self.backend = pick_backend(backend, device, source.has_graphs)
        if max_batch == 1 and self.backend in ("onnxruntime", "tensorrt") and "graphs" not in backend_opts:
            backend_opts["graphs"] = tuple(g for g in GRAPHS if g != BATCH_GRAPH)  # no session for an unused graph
        runner = make_runner(self.backend, source, device=device, threads=threads, **backend_opts)
        runner.activate()
        if wrap is not None:  # e.g. a TimedRunner / RecordingRunner around the backend: the engine calls it instead
            runner = wrap(runner)
        if tokenizer is None:
            codec = TextCodec.from_dir(source.tokenizer_dir) if source.tokenizer_dir else _codec_of(source)
        elif isinstance(tokenizer, (str, Path)):
            codec = TextCodec.from_dir(Path(tokenizer))
        else:
            codec = TextCodec(tokenizer, type(tokenizer).__name__)
        core = _Core(source, runner, codec)
        core.overlap_memorize = bool(overlap_memorize)
        if max_batch > 1:
            try:
                core.batcher = for_engine(runner, source, self.backend, max_batch, backend_opts.get("quantized"))
            except ValueError:
                runner.deactivate()
                raise
        super().__init__(core, seed)

    def session(self, seed: int | None = None) -> Session:
        """An independent memory (initial state) over the same weights and backend objects."""
        return Session(self._core, seed)

    @property
    def runner(self):
        """The runner every call of this engine goes through (the ``wrap``-ped one when ``wrap`` was given)."""
        return self._core.runner

    @property
    def source(self):
        """What the engine opened (``artifact.source.Source``: manifest, config, limits)."""
        return self._core.source

    @property
    def codec(self):
        """The engine's ``TextCodec`` (tokenizer)."""
        return self._core.codec

    def describe(self) -> dict:
        d = {**self._core.runner.describe(), "source": self._core.source.name, "kind": self._core.cfg.kind}
        if self._core.batcher is not None:
            d["batch"] = self._core.batcher.stats()
        return d

    def close(self) -> None:
        """Release the backend (for every session of this engine). Later calls raise ``EngineClosed``; the
        host memory stays readable (``memory``, ``save_memory``). Waits for a call in progress on the engine's
        own session; close only when no other session of this engine is in a call. Idempotent."""
        with self._lock:
            with self._core._lock:
                if self._core.closed:
                    return
                self._core.closed = True
            if self._core.batcher is not None:
                self._core.batcher.close()
            self._core.runner.deactivate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _codec_of(source: Source) -> TextCodec:
    """Tokenizer that came with a preset (``demo``) or model, if any."""
    tok = source.extra.get("tokenizer") or getattr(source.model, "tokenizer", None)
    return TextCodec(tok, source.name)
