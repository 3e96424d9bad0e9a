"""Terminal completion / chat REPL on an edgekit bundle (torch-free: onnxruntime, numpy, tokenizers).

    python sample_apps/terminal/app.py --bundle DIR            # completion: each line is a prompt
    python sample_apps/terminal/app.py --bundle DIR --chat     # chat: the transcript is the prompt

Typed ``\\n`` and ``\\t`` become a newline / tab, so one line can hold a multi-line code prompt.
Commands: ``/set KEY VALUE`` (max_new_tokens, temperature, top_k, top_p, seed), ``/reset`` (chat:
forget the transcript), ``/info`` (bundle version and features), ``/quit``. Text streams as it is
generated; bad settings print the engine's one-line error and the REPL goes on.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))          # the edgekit checkout

from edgekit.errors import EdgekitError  # noqa: E402
from edgekit.runtime import Engine, GenerationConfig  # noqa: E402

SETTABLE = {"max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int}
USER, BOT = "User: ", "Assistant:"


def unescape(line: str) -> str:
    return line.replace("\\n", "\n").replace("\\t", "\t")


def command(line: str, cfg: GenerationConfig, engine: Engine, out) -> GenerationConfig | None:
    """Apply a /command; returns the (possibly new) config, or None to quit."""
    parts = line.split()
    if parts[0] == "/quit":
        return None
    if parts[0] == "/info":
        print(engine.get_version_info(), file=out)
    elif parts[0] == "/set" and len(parts) == 3 and parts[1] in SETTABLE:
        try:
            cfg = replace(cfg, **{parts[1]: SETTABLE[parts[1]](parts[2])})
            print(f"[{parts[1]} = {parts[2]}]", file=out)
        except ValueError:
            print(f"error: {parts[1]} takes a {SETTABLE[parts[1]].__name__}", file=out)
        except EdgekitError as e:
            print(f"error: {e}", file=out)
    elif parts[0] != "/reset":
        print(f"commands: /set {{{'|'.join(SETTABLE)}}} VALUE, /reset, /info, /quit", file=out)
    return cfg


def repl(engine: Engine, cfg: GenerationConfig, chat: bool, inp=sys.stdin, out=sys.stdout) -> None:
    transcript = ""
    if chat:
        cfg = replace(cfg, stop=tuple(cfg.stop) + ("\n" + USER.strip(),), truncate="left")
    print(f"edgekit {engine.get_version_info()['model_name']} ({'chat' if chat else 'completion'}; /quit to end)",
          file=out)
    while True:
        print("> ", end="", file=out, flush=True)
        line = inp.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.startswith("/"):
            if line.startswith("/reset"):
                transcript = ""
            cfg = command(line, cfg, engine, out)
            if cfg is None:
                break
            continue
        prompt = transcript + f"{USER}{unescape(line)}\n{BOT}" if chat else unescape(line)
        reply = []
        try:
            for piece in engine.stream(prompt, cfg):
                reply.append(piece)
                print(piece, end="", file=out, flush=True)
        except EdgekitError as e:
            print(f"error: {e}", end="", file=out)
        print(file=out)
        if chat:
            transcript = prompt + "".join(reply).rstrip() + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True, help="an `edgekit compress` output directory")
    ap.add_argument("--chat", action="store_true", help="keep a User/Assistant transcript as context")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="default: the bundle's target")
    a = ap.parse_args(argv)
    try:
        engine = Engine.from_bundle(a.bundle, threads=a.threads)
        cfg = GenerationConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                               top_p=a.top_p, seed=a.seed)
    except EdgekitError as e:
        sys.exit(f"error: {e}")
    repl(engine, cfg, a.chat)


if __name__ == "__main__":
    main()
