"""Text in, text out from a bundle: ``Engine.from_bundle(dir).generate(prompt, ...)`` and ``.stream``.

What: ``Engine`` wraps ``OrtModel`` (one ONNX graph, MLA latent cache) with the bundle's tokenizer,
its target's thread settings and sampling. ``GenerationConfig`` holds the knobs (validated up
front); ``sample`` picks one token from one logits row; ``TextStream`` turns token ids into text
pieces incrementally and applies stop strings. The HTTP sample app reuses these pieces to step
several requests in one batch (sample_apps/server).

Why: the device has onnxruntime, numpy and tokenizers, not torch. This module imports only those
plus the stdlib and torch-free edgekit modules (errors, bundle, runtime.session); the target's
threads/spinning come from the bundle's ``recipe.toml`` read as plain TOML (only ``[target]``
threads/spinning are needed, so a recipe from another edgekit version still loads).

Invariants:
- the prompt is encoded without special tokens (as ``reference.json`` was recorded), so
  ``generate(p, temperature=0)`` reproduces the bundle's recorded greedy tokens;
- prompt tokens + ``max_new_tokens`` <= the graph's ``max_position_embeddings`` (RoPE table end);
  ``truncate="left"`` drops the oldest prompt tokens to fit instead of raising;
- streamed pieces concatenate to exactly the returned text: a piece never ends inside a UTF-8
  character split across byte-level BPE tokens (held back until complete), and text that might be
  the start of a stop string is held back until it is known not to be one.

Failure modes: bad settings, empty or too-long prompts and tampered bundles raise ``EdgekitError``
with one line naming the fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import bundle as _bundle
from ..errors import EdgekitError
from .session import OrtModel

TRUNCATE = ("error", "left")
REPLACEMENT = "\ufffd"     # what a byte-level decoder yields for an incomplete UTF-8 sequence


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0      # 0 = greedy (argmax); > 0 samples from softmax(logits / temperature)
    top_k: int = 0                # keep the k most likely tokens before sampling; 0 = all
    top_p: float = 1.0            # keep the smallest set whose probability reaches top_p (nucleus)
    stop: tuple[str, ...] = ()    # end when the text contains one of these (it is not returned)
    seed: int | None = None       # sampling RNG seed; None = fresh entropy
    truncate: str = "error"       # prompt too long for the context: "error" or "left" (drop oldest tokens)
    stop_at_eos: bool = True

    def __post_init__(self):
        def bad(msg):
            raise EdgekitError(msg)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad(f"max_new_tokens={self.max_new_tokens!r}: pass an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            bad(f"temperature={self.temperature!r}: pass a number >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k={self.top_k!r}: pass an integer >= 0 (0 = no top-k filter)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad(f"top_p={self.top_p!r}: pass a number in (0, 1] (1 = no nucleus filter)")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad(f"stop={self.stop!r}: pass non-empty strings")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            bad(f"seed={self.seed!r}: pass an integer >= 0 (or none for fresh entropy)")
        if self.truncate not in TRUNCATE:
            bad(f"truncate={self.truncate!r}: use one of {TRUNCATE}")


def sample(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator) -> int:
    """One token from logits [V]: argmax at temperature 0, else top-k / top-p filtered sampling."""
    if cfg.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / cfg.temperature
    order = np.argsort(-z)                                     # [V] most likely first
    if cfg.top_k:
        order = order[:cfg.top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if cfg.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(p), cfg.top_p)) + 1  # smallest prefix reaching top_p
        p = p[:keep] / p[:keep].sum()
        order = order[:keep]
    return int(order[rng.choice(len(p), p=p)])


class TextStream:
    """Token ids -> text pieces. ``push(id)`` returns the newly safe text ('' while waiting);
    ``stopped`` turns True once a stop string appears; ``flush()`` returns what was held back.

    Constant work per token (a streaming server calls this for every row at every step): only the
    ids since the last complete character are decoded, with a few ids before them as context
    (decoders that strip a leading space, e.g. Metaspace, need it), and the new text is what that
    window decodes to beyond its context; the full text equals decoding all ids at once."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tok, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""          # decoded text of all ids (complete characters only)
        self.sent = 0           # chars of self.text already returned
        self.stopped = False
        self._ctx = 0           # ids[_ctx:_done] are context for decoding ids[_done:]
        self._done = 0          # ids[:_done] are in self.text

    def _tail(self) -> str:
        """Text of ids[_done:] (may end in an incomplete character)."""
        window = self.tok.decode(self.ids[self._ctx:], skip_special_tokens=True)
        context = self.tok.decode(self.ids[self._ctx:self._done], skip_special_tokens=True)
        return window[len(context):] if window.startswith(context) else \
            self.tok.decode(self.ids, skip_special_tokens=True)[len(self.text):]

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        new = self._tail()
        if new.endswith(REPLACEMENT):           # a multi-byte character is still incomplete
            return ""
        text = self.text = self.text + new
        self._ctx, self._done = max(self._done - 4, 0), len(self.ids)
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped, self.text = True, text[:cut]
            return self._emit(len(self.text))
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._emit(len(text) - hold)

    def flush(self) -> str:
        if not self.stopped:
            self.text += self._tail()
            self._ctx = self._done = len(self.ids)
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece


@dataclass
class Engine:
    model: OrtModel
    tokenizer: object
    manifest: dict = field(default_factory=dict)
    bundle_dir: Path | None = None
    threads: int | None = None
    spinning: bool | None = None

    @classmethod
    def from_bundle(cls, bundle_dir, threads: int | None = None, spinning: bool | None = None,
                    verify: bool = True) -> Engine:
        """Load a ``edgekit compress`` bundle; threads/spinning default to its target's [target] table."""
        d = Path(bundle_dir)
        manifest = _bundle.verify(d) if verify else _bundle.read_manifest(d)
        target = _bundle.read_target(d)
        threads = threads or target.get("threads") or manifest.get("threads")
        spinning = spinning if spinning is not None else target.get("spinning", manifest.get("spinning"))
        if not (d / "tokenizer.json").exists():
            raise EdgekitError(f"{d} has no tokenizer.json; rebuild the bundle with `edgekit compress`")
        tokenizer = _bundle.read_tokenizer(d, "bundle")
        config = target.get("session_config", {})
        return cls(OrtModel(d, threads=threads, spinning=spinning, session_config=config), tokenizer, manifest, d,
                   threads, spinning)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def max_positions(self) -> int:
        return self.model.max_positions

    @property
    def eos_token_id(self) -> int | None:
        return self.model.spec.get("eos_token_id")

    def get_version_info(self) -> dict:
        """Version, features and recommended hardware of the loaded bundle."""
        if self.bundle_dir is None:
            raise EdgekitError("this engine was not loaded from a bundle; use Engine.from_bundle(dir)")
        return _bundle.get_version_info(self.bundle_dir)

    # -- prompt handling ------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise EdgekitError(f"prompt is a {type(prompt).__name__}; pass a str")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise EdgekitError(f"the prompt is not valid Unicode (a lone surrogate {prompt[e.start]!r} at "
                               f"character {e.start}); send UTF-8 text") from None
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        if not prompt or not ids:
            raise EdgekitError("the prompt is empty; pass at least one character of text")
        return ids

    def fit(self, ids: list[int], cfg: GenerationConfig) -> list[int]:
        """Check prompt + new tokens against the context; truncate left if the config says so."""
        room = self.max_positions - cfg.max_new_tokens
        if room < 1:
            raise EdgekitError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the "
                               f"{self.max_positions}-token context; lower max_new_tokens")
        if len(ids) > room:
            if cfg.truncate == "left":
                return ids[-room:]
            raise EdgekitError(f"the prompt has {len(ids)} tokens; with max_new_tokens={cfg.max_new_tokens} "
                               f"at most {room} fit the {self.max_positions}-token context: shorten it, lower "
                               "max_new_tokens or pass truncate='left'")
        return ids

    def config(self, cfg: GenerationConfig | None = None, **settings) -> GenerationConfig:
        return replace(cfg or GenerationConfig(), **settings) if settings else (cfg or GenerationConfig())

    # -- generation ----------------------------------------------------------------------------
    def stream_ids(self, ids: list[int], cfg: GenerationConfig) -> Iterator[int]:
        """Token ids after the prompt ids (already fitted), one at a time; ends at EOS or the limit."""
        rng = np.random.default_rng(cfg.seed)
        logits, cache = self.model.prefill(np.asarray([ids], np.int64), capacity=len(ids) + cfg.max_new_tokens)
        for i in range(cfg.max_new_tokens):
            tok = sample(logits[0], cfg, rng)
            if cfg.stop_at_eos and tok == self.eos_token_id:
                return
            yield tok
            if i + 1 < cfg.max_new_tokens:
                logits = self.model.decode(np.asarray([tok], np.int64), cache)

    def stream(self, prompt: str, cfg: GenerationConfig | None = None, **settings) -> Iterator[str]:
        """Text pieces of the continuation as they are generated (settings: GenerationConfig fields)."""
        cfg = self.config(cfg, **settings)
        ids = self.fit(self.encode(prompt), cfg)
        ts = TextStream(self.tokenizer, cfg.stop)
        for tok in self.stream_ids(ids, cfg):
            piece = ts.push(tok)
            if piece:
                yield piece
            if ts.stopped:
                return
        tail = ts.flush()
        if tail:
            yield tail

    def generate(self, prompt: str, cfg: GenerationConfig | None = None, **settings) -> str:
        """The continuation of ``prompt`` as one string (settings: GenerationConfig fields)."""
        return "".join(self.stream(prompt, cfg, **settings))


def get_version_info(bundle_dir) -> dict:
    """Version, features and recommended hardware of a bundle, without loading the graph."""
    return _bundle.get_version_info(bundle_dir)
