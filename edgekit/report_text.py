"""Terminal rendering (rich tables) of the dicts that library functions return.

Kept apart from the CLI so the CLI stays thin and the same dicts serve ``--json``.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _fmt(n: int) -> str:
    return f"{n / 1e6:.3f}M"


def render_info(info: dict) -> None:
    con = Console()
    con.print(f"[bold]{info.get('name') or 'model'}[/] ({info['architecture']}): "
              f"{_fmt(info['params_total'])} params, {_fmt(info['params_active'])} active per token")
    t = Table("kind", "params", "share")
    for k, v in info["breakdown"].items():
        t.add_row(k, _fmt(v), f"{100 * v / info['params_total']:.1f}%")
    con.print(t)
    lt = Table("layer", "heads", "ffn", "experts (top-k)", "ffn width")
    for r in info["layers"]:
        if r["ffn"] == "dense":
            lt.add_row(str(r["layer"]), str(r["heads"]), "dense", "-", str(r["intermediate_size"]))
        else:
            lt.add_row(str(r["layer"]), str(r["heads"]), "moe", f"{r['experts']} ({r['top_k']})",
                       str(r["expert_intermediate"]))
    con.print(lt)
    kv = info["kv_cache"]
    con.print(f"KV cache: {kv['latent']} B/token (MLA latent, fp32) vs {kv['per_head_kv']} B/token "
              f"for per-head K/V ({kv['ratio']:.1f}x smaller)")
