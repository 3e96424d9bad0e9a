"""The shipped reference models' recipes: architecture, corpus, tokenizer and storage, by name.

What: ``SPECS["v3-nano"]`` and ``SPECS["v3-mini"]`` (``ModelSpec``) tell ``tokenizer.py`` and
``train.py`` which config to build, which train text and held-out splits to read, where the shipped
tokenizer lives, and in which dtype the checkpoint is stored; one training script serves both.

v3-mini is shaped like DeepSeek-V3's fine-grained MoE, scaled down: 64 routed experts per MoE layer
in 8 groups, top-4 groups and top-6 experts per token (V3: 256 in 8 groups, top-4, top-8), one
shared expert as wide as a routed one, routed experts 1/4 of the hidden width (V3: 2048/7168),
sigmoid scoring with the aux-loss-free correction bias; MLA exactly as v3-nano. Routed experts hold
81% of its 19.33M parameters, so pruning the experts a domain does not call is what can shrink it.

Why vocab 4096 for v3-mini too (measured on the shipped eval splits with ``python -m
edgekit.nano.tokenizer --model v3-mini --vocab N``, 2-core dev VM): 8192 encodes python/c/prose eval
text at 3.56/2.73/3.48 bytes per token, 4096 at 3.24/2.52/3.05, i.e. 8-14% more tokens. But the
embedding and output head are the one part pruning cannot shrink: at 8192 they are 20% of v3-mini's
parameters, at 4096 11% (DeepSeek-V3: 0.3%). A reference meant to show how far expert pruning takes
a V3-shaped MoE towards 1/8 of the fp32 size should not spend ~5% of that size on a vocabulary, so
v3-mini keeps 4096 (and the same tokens-per-byte regime as v3-nano).

Invariants: the held-out names are ``<split>`` (v3-nano) or ``<domain>/<split>`` (v3-mini); model
selection during training reads only ``calib`` splits, never ``eval``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data import shipped_file
from . import corpus, mixed

DATA_DIR = corpus.PACKAGE_DIR.parent / "data"
TOKENS_DIR = corpus.REPO_ROOT / ".corpus" / "tokens"

NANO_CONFIG = dict(
    vocab_size=4096, hidden_size=256, num_hidden_layers=6, intermediate_size=640,
    num_attention_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, moe_intermediate_size=160, first_k_dense_replace=1, n_group=4,
    topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, scoring_func="sigmoid",
    topk_method="noaux_tc", max_position_embeddings=2048, rope_theta=10000.0,
    tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
)
MINI_CONFIG = {**NANO_CONFIG, "n_routed_experts": 64, "num_experts_per_tok": 6,
               "moe_intermediate_size": 64, "n_group": 8, "topk_group": 4}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: dict
    storage_dtype: str                 # "float16" | "bfloat16" (router weights always stay fp32)
    domains: tuple[str, ...]           # () for a single-domain corpus
    corpus_command: str

    @property
    def dir(self) -> Path:
        return DATA_DIR / self.name

    @property
    def tokenizer(self) -> Path:
        return self.dir / "tokenizer.json"

    @property
    def manifest(self) -> Path:
        return mixed.MANIFEST_PATH if self.domains else corpus.MANIFEST_PATH

    @property
    def tokens_dir(self) -> Path:
        return TOKENS_DIR / self.name

    def train_texts(self) -> list[Path]:
        if not self.domains:
            return [corpus.TRAIN_PATH]
        return [mixed.TRAIN_DIR / f"{d}.txt" for d in self.domains]

    def heldout_paths(self) -> dict[str, Path]:
        """name -> shipped text; ``calib`` ones drive model selection, ``eval`` ones are reported."""
        if not self.domains:
            return {s: shipped_file(corpus.SPLITS_DIR, s) for s in ("calib", "eval")}
        return {f"{d}/{s}": shipped_file(mixed.DOMAINS_DIR / d, s) for d in self.domains for s in ("calib", "eval")}


SPECS = {
    "v3-nano": ModelSpec("v3-nano", NANO_CONFIG, "float16", (), "python -m edgekit.nano.corpus"),
    "v3-mini": ModelSpec("v3-mini", MINI_CONFIG, "bfloat16", tuple(mixed.DOMAINS), "python -m edgekit.nano.mixed"),
}
