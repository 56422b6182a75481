"""The round reaches the engine: a model the continual-learning round promotes (or `--rollback`
brings back) is served by a running `chatforge serve --upstream` without a restart where its
engine loads LoRA adapters at runtime, else the round prints the commands that serve it.

    chatforge serve --model runs/demo/assistant --upstream http://127.0.0.1:8001 --admin-key "$CHATFORGE_ADMIN_KEY" &
    chatforge pipeline --feedback runs/demo/feedback.sqlite --server http://127.0.0.1:8000   # the key from the env
    chatforge pipeline --rollback --server http://127.0.0.1:8000

What happens (`reach_engine`), for the promoted model M (a folder the round's aligner wrote):
1. The server is asked what its engine serves (GET /admin/upstream): vLLM lists its base model
   with `root`, the folder it loaded; when that is a `chatforge export --format hf` folder, its
   chatforge_export.json names the chatforge folder the engine serves (the base).
2. M's LoRA adapter (`--lora-save adapter`, which the round asks its aligners and SFT step for)
   is written in PEFT's format to `M-peft/` beside M (`model/adapter_export.write_peft`). An
   engine applies one adapter to its base, but a round starts from the model served then, often
   itself base + an earlier round's adapter: the adapters from M down to the engine's base are
   composed into one, exactly (the updates add up: s1 B1 A1 + s2 B2 A2 = [s1 B1 | s2 B2] [A1; A2],
   rank r1 + r2; every link checked against its own base first, `check_against_base`).
3. POST /admin/upstream {"model": NAME, "adapter": M-peft}: the server has its engine load it
   (vLLM's /v1/load_lora_adapter) and sends new requests to NAME; the requests already streaming
   finish on the old model. NAME is `RUN-roundN-ALGO-` plus the adapter's digest, so a round run
   again with other weights never reuses a stale adapter the engine holds.
Rollback to a model no round made (the pipeline's `sft`: the engine's own base) sends
{"model": null}: back to the model the engine served at first.

When there is no --server, the engine cannot load adapters at runtime (llama-server takes
`--lora FILE` at start; Ollama an `ADAPTER` line and `ollama create`; vLLM without
VLLM_ALLOW_RUNTIME_LORA_UPDATING), there is no adapter (a full fine-tune, PPO) or it leads to
another base than the engine's, the round prints the exact commands instead (`commands`).
The promotion itself (runs/NAME/assistant) has happened either way; nothing here undoes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
from pathlib import Path

import httpx
import torch

from chatforge.errors import ChatforgeError
from chatforge.model.adapter_export import (
    PEFT_WEIGHTS,
    Adapter,
    check_against_base,
    no_adapter_message,
    read_adapter,
    write_peft,
)
from chatforge.model.export import MARKER
from chatforge.model.folder import load_config
from chatforge.model.lora import ADAPTER_CONFIG, read_adapter_config

PEFT_SUFFIX = "-peft"
MAX_CHAIN = 16        # adapters composed at most (a rank each round adds)
ADMIN_KEY_ENV = "CHATFORGE_ADMIN_KEY"


def adapter_folders(model: Path, engine_base: Path | None) -> list[Path]:
    """The model folders from `model` down to the engine's base, each a LoRA over the next; the
    last one's base is `engine_base` (None: the first folder without an adapter). Raises
    ChatforgeError saying why the chain does not lead there."""
    chain, folder = [], Path(model)
    while True:
        if not (folder / ADAPTER_CONFIG).is_file():
            if not chain:
                raise ChatforgeError(no_adapter_message(folder))
            raise ChatforgeError(f"{chain[-1]} was trained on {folder}, which holds no adapter and is not the model the "
                                 f"engine serves ({engine_base}): the engine needs {model} exported whole")
        base = read_adapter_config(folder).get("base")
        if not base:
            raise ChatforgeError(f"the adapter of {folder} does not name the folder it was trained on")
        chain.append(folder)
        base = Path(base)
        if (engine_base is not None and base.resolve() == engine_base.resolve()) or \
                (engine_base is None and not (base / ADAPTER_CONFIG).is_file()):
            return chain
        if len(chain) >= MAX_CHAIN:
            raise ChatforgeError(f"{model} is more than {MAX_CHAIN} adapters away from the engine's model; export it "
                                 "whole")
        folder = base


def compose(adapters: list) -> object:
    """One adapter doing what `adapters` (model first, its base's next, ...) do together:
    per module the updates add up, so A stacks the scaled A's and B the B's (rank: their sum,
    scaling 1). A module one of them does not adapt gets zero rows there."""
    if len(adapters) == 1:
        return adapters[0]
    names = list(dict.fromkeys(n for a in adapters for n in a.modules))
    shapes = {n: (a.modules[n][0].shape[1], a.modules[n][1].shape[0]) for a in reversed(adapters) for n in a.modules}
    rank = sum(a.rank for a in adapters)
    modules = {}
    for name in names:
        n_in, n_out = shapes[name]
        As, Bs = [], []
        for a in adapters:
            if name in a.modules:
                A, B = a.modules[name]
                As.append(A.float() * a.scaling)
                Bs.append(B.float())
            else:
                As.append(torch.zeros(a.rank, n_in))
                Bs.append(torch.zeros(n_out, a.rank))
        modules[name] = (torch.cat(As, 0), torch.cat(Bs, 1))
    return Adapter(adapters[0].folder, rank, float(rank), 0.0, modules, adapters[-1].base,
                   [n for a in adapters for n in a.notes])


def export_peft(model: Path, engine_base: Path | None) -> tuple[Path, str, int, Path]:
    """Write `model`'s adapter over the engine's base (composed, see the module docstring) in
    PEFT's format to `model-peft/`; returns (that folder, a digest of its weights, its rank, the
    base it applies to)."""
    config = load_config(model)
    adapters = []
    for folder in adapter_folders(model, engine_base):
        adapter = read_adapter(folder, config)
        check_against_base(adapter, folder)
        adapters.append(adapter)
    adapter = compose(adapters)
    out = model.parent / f"{model.name}{PEFT_SUFFIX}"
    tmp = model.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_peft(adapter, config, tmp, base_name=str(adapter.base))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    digest = hashlib.sha256((out / PEFT_WEIGHTS).read_bytes()).hexdigest()[:10]
    return out, digest, adapter.rank, adapter.base


def adapter_name(run_dir: Path, model: Path, digest: str) -> str:
    """The engine's model name of `model`'s adapter: runs/demo/rounds/2/dpo -> demo-round2-dpo-<digest>."""
    model = model.resolve()
    where = f"round{model.parent.name}-" if model.parent.parent == (run_dir / "rounds").resolve() else ""
    return f"{run_dir.resolve().name}-{where}{model.name}-{digest}"


def made_by_round(run_dir: Path, model: Path) -> bool:
    return Path(model).resolve().parent.parent == (run_dir / "rounds").resolve()


class Server:
    """The admin API of a running `chatforge serve --upstream` (`serve/app.py`)."""

    def __init__(self, url: str, key: str | None):
        if not url.startswith(("http://", "https://")):
            raise ChatforgeError(f"--server must be the URL of a running chatforge serve, e.g. http://127.0.0.1:8000, "
                                 f"got {url!r}")
        self.url = url.rstrip("/")
        self.http = httpx.Client(headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=300.0)

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            r = self.http.request(method, self.url + path, json=body)
        except httpx.HTTPError as e:
            raise ChatforgeError(f"the server at {self.url} cannot be reached ({e})") from None
        try:
            data = r.json()
        except ValueError:
            data = {}
        if r.status_code != 200:
            error = data.get("error") if isinstance(data, dict) else None
            message = error.get("message") if isinstance(error, dict) else r.text[:300]
            raise ServerRefused(r.status_code, str(message), (error or {}).get("code") if isinstance(error, dict) else None)
        return data


class ServerRefused(ChatforgeError):
    def __init__(self, status: int, message: str, code: str | None):
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.code = status, message, code


def engine_base(status: dict) -> Path | None:
    """The chatforge folder the engine serves, from its base model card's `root` (vLLM: the
    folder it loaded) when that is a `chatforge export --format hf` folder this machine can read."""
    for card in status.get("engine_models") or []:
        root = card.get("root") if not card.get("parent") else None
        marker = Path(root) / MARKER if isinstance(root, str) and root else None
        if marker is not None and marker.is_file():
            info = json.loads(marker.read_text(encoding="utf-8"))
            if info.get("format") == "hf" and info.get("source"):
                return Path(info["source"])
    return None


def reach_engine(run_dir: Path, model: Path, server: str | None, key: str | None = None) -> dict:
    """Serve `model` (just promoted, or rolled back to) on the engine behind `server`, or print
    the commands that do; returns what happened (round.json's `engine`)."""
    key = key or os.environ.get(ADMIN_KEY_ENV) or None
    model = Path(model)
    result: dict = {"server": server, "switched": False}
    status: dict = {}
    admin = None
    try:
        if server:
            admin = Server(server, key)
            status = admin.call("GET", "/admin/upstream")
            result["engine"] = status.get("url")
        if not made_by_round(run_dir, model):
            # The pipeline's own model: what the engine was started on.
            if admin is not None:
                done = admin.call("POST", "/admin/upstream", {"model": None})
                result.update(switched=True, model=done["model"])
                print(f"engine: new requests go to {done['model']} (the engine's own model) at {status.get('url')}; "
                      f"the ones in flight finish on {done['previous']}")
                return result
            raise ChatforgeError(f"{model} is the model the engine was started on")
        base = engine_base(status)
        peft, digest, rank, applies_to = export_peft(model, base)
        name = adapter_name(run_dir, model, digest)
        result.update(peft=str(peft), adapter=name, rank=rank, base=str(applies_to))
        print(f"engine: {model}'s adapter over {applies_to} in PEFT's format: {peft} (rank {rank})")
        if admin is None:
            raise ChatforgeError("no --server was given")
        done = admin.call("POST", "/admin/upstream", {"model": name, "adapter": str(peft.resolve())})
        result.update(switched=True, model=done["model"], loaded=done.get("loaded"))
        print(f"engine: {'loaded' if done.get('loaded') else 'already held'} {name} at {status.get('url')}; new "
              f"requests go to it, the ones in flight finish on {done['previous']}")
    except ChatforgeError as e:
        why = e.message if isinstance(e, ServerRefused) else str(e)
        result["why_not"] = why
        print(f"engine: not switched ({why}). To serve {model} there:")
        for line in commands(run_dir, model, result, server, status):
            print("  " + line)
    return result


def commands(run_dir: Path, model: Path, result: dict, server: str | None, status: dict) -> list[str]:
    """The commands that serve `model` on each kind of engine (see the module docstring)."""
    q = shlex.quote
    srv = server or "http://127.0.0.1:8000"
    engine = status.get("url") or "http://127.0.0.1:8001"
    auth = f'-H "Authorization: Bearer ${ADMIN_KEY_ENV}" '
    out_dir = run_dir / "export" / (f"round{model.resolve().parent.name}-{model.name}" if made_by_round(run_dir, model)
                                    else model.name)
    lines = []
    if not made_by_round(run_dir, model):
        lines += ["# a `chatforge serve --upstream` started on this engine: back to the engine's own model",
                  f"curl -X POST {srv}/admin/upstream {auth}-H 'Content-Type: application/json' -d '{{\"model\": null}}'"]
    elif result.get("peft"):
        body = json.dumps({"model": result["adapter"], "adapter": str(Path(result["peft"]).resolve())})
        lines += [f"# vLLM serving an export of {result['base']} (--enable-lora --max-lora-rank >= {result['rank']}, "
                  "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True): load the adapter and move the server to it",
                  f"curl -X POST {srv}/admin/upstream {auth}-H 'Content-Type: application/json' -d {q(body)}",
                  "# vLLM without runtime loading: restart it with the adapter, then the server on its name",
                  f"python -m vllm.entrypoints.openai.api_server --model BASE_HF_EXPORT --enable-lora "
                  f"--max-lora-rank {result['rank']} --lora-modules {result['adapter']}={q(str(Path(result['peft']).resolve()))}",
                  f"chatforge serve --model {q(str(run_dir / 'assistant'))} --upstream {engine} "
                  f"--upstream-model {result['adapter']} ..."]
    whole = out_dir / "gguf"
    gguf = whole / f"{model.name}-q8_0.gguf"
    lines += ["# llama-server or Ollama (no runtime loading): export the model whole and restart the engine on it",
              f"chatforge export --model {q(str(model))} --format gguf --quant q8_0 --out {q(str(whole))}",
              f"llama-server -m {q(str(gguf))} --port PORT ...   # the engine's other options as before",
              f"ollama create {run_dir.resolve().name}-{model.name} -f {q(str(whole / 'Modelfile'))}   # Ollama; then "
              f"serve --upstream-model {run_dir.resolve().name}-{model.name}",
              "# vLLM: the same whole, restarted",
              f"chatforge export --model {q(str(model))} --format hf --out {q(str(out_dir / 'hf'))}"]
    return lines
