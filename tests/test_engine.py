"""The inference engine: KV cache, batching, greedy / beam / sampling, HF parity, streaming, stops."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
import transformers
from transformers.generation import logits_process as hf_lp

from chatforge.errors import ChatforgeError
from chatforge.infer import sampling
from chatforge.infer.engine import Engine, GenerationConfig, KVCache
from chatforge.model.gpt import GPT, GPTConfig

VOCAB = 96
EOS = 7


def tiny_model(n_kv_head: int = 2, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_ff=64,
                          max_seq_len=64)).eval()
    with torch.no_grad():  # random-init outputs are nearly uniform: sharpen them
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


def hf_twin(model: GPT) -> transformers.LlamaForCausalLM:
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.hf_config())).eval()
    hf.load_state_dict(model.hf_state_dict(), strict=False)
    return hf


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_model()


PROMPTS = [[3, 14, 15, 92, 65], [35, 89], [79, 32, 38, 46, 26, 43, 38, 32, 79]]


def hf_generate(hf, prompt, **kw):
    with torch.inference_mode():
        return hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           pad_token_id=0, **kw)


def strip_eos(tokens: list[int]) -> tuple[list[int], bool]:
    return (tokens[:tokens.index(EOS)], True) if EOS in tokens else (tokens, False)


# ------------------------------------------------------------------------------ cache, batching

def test_cached_greedy_equals_full_recompute(model):
    engine = Engine(model, stop_ids=[], dtype="float32")
    for prompt in PROMPTS:
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(20):
                logits, _ = model(torch.tensor([seq]))
                seq.append(int(logits[0, -1].argmax()))
        out = engine.generate([prompt], GenerationConfig(max_new_tokens=20))[0]
        assert out.tokens == seq[len(prompt):]
        assert out.finish_reason == "length" and out.prompt_tokens == len(prompt)


def test_kv_cache_writes_in_place():
    cache = KVCache(n_layer=2, batch=3, n_kv_head=2, max_len=10, head_dim=4)
    ptr = cache.k.data_ptr()
    for step in range(4):
        for layer in range(2):
            k = torch.full((3, 2, 1, 4), float(step))
            k_all, v_all = cache.update(layer, k, k)
            assert k_all.shape == (3, 2, step + 1, 4) and k_all.data_ptr() == cache.k[layer].data_ptr()
    assert cache.pos == 4 and cache.k.data_ptr() == ptr
    assert cache.k[1, :, :, 3].eq(3).all()


def test_kv_cache_select_rows_moves_only_what_changes():
    cache = KVCache(n_layer=2, batch=4, n_kv_head=1, max_len=6, head_dim=2)
    for layer in range(2):
        kv = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 5, 2) + 10 * layer
        cache.update(layer, kv, -kv)
    before = cache.k.clone()
    rows = [1, 0, 0, 3]                       # rows 0 and 1 swap, row 2 copies row 0, row 3 stays
    cache.select_rows(rows, start=2)
    want = before.clone()
    want[:, :, :, 2:5] = before[:, rows, :, 2:5]
    assert torch.equal(cache.k[:, :, :, :5], want[:, :, :, :5])
    assert torch.equal(cache.v[:, :, :, :5], -want[:, :, :, :5])
    cache.select_rows(torch.tensor([0, 0, 2, 2]))  # a tensor, from position 0 (prefill fan-out)
    assert torch.equal(cache.k[:, 1, :, :5], want[:, 0, :, :5])
    assert torch.equal(cache.k[:, 3, :, :5], want[:, 2, :, :5])


def test_bf16_weights_by_default_where_native(model, monkeypatch):
    from chatforge import runtime

    native = runtime.bf16_supported(torch.device("cpu"))
    fp32 = Engine(model, stop_ids=[], dtype="float32")
    assert fp32.model is model and fp32.cache_dtype == torch.float32 and fp32.threads == 1
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: False)
    assert Engine(model, stop_ids=[]).model is model             # auto: fp32 where bf16 is emulated
    with pytest.warns(UserWarning, match="native"):
        assert Engine(model, stop_ids=[], dtype="bfloat16").model is model
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: True)
    engine = Engine(model, stop_ids=[])                           # auto: bf16 where native
    assert next(engine.model.parameters()).dtype == torch.bfloat16 and engine.model.rope_cos.dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32 and engine.model is not model
    # Still tied: the head (prepacked for oneDNN where that works) is the embedding's weights.
    x = torch.randn(3, model.config.d_model, dtype=torch.bfloat16)
    head = engine.model.lm_head(x) if native else x @ engine.model.lm_head.weight.T
    assert torch.allclose(head.float(), (x @ engine.model.embed_tokens.weight.T).float(), atol=1e-2, rtol=1e-2)
    assert engine.cache_dtype == torch.bfloat16                   # the cache in the weights' dtype
    if native:  # bf16 kernels run (fast) only where native: greedy over the bf16 cache equals a
        # full bf16 recompute at each step.
        for prompt in PROMPTS:
            seq = list(prompt)
            with torch.no_grad():
                for _ in range(8):
                    seq.append(int(engine.model(torch.tensor([seq]))[0][0, -1].argmax()))
            assert engine.generate([prompt], GenerationConfig(max_new_tokens=8))[0].tokens == seq[len(prompt):]
        beam = engine.generate(PROMPTS, GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=8))
        assert all(r.score is not None and len(r.tokens) == 8 for r in beam)
    with pytest.raises(ChatforgeError, match="dtype"):
        Engine(model, dtype="int3")


@pytest.mark.parametrize("kw", [dict(n_kv_head=2), dict(n_kv_head=4, qkv_bias=True), dict(n_experts=3)])
def test_fused_projections_keep_the_outputs(kw):
    """q/k/v and gate/up joined into one layer each (model/fuse.py; the engine does it to the
    copies it makes) compute what the separate layers did, and leave the model given alone."""
    import copy

    from chatforge.model.fuse import fuse_projections

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_ff=64, max_seq_len=64,
                          **{"n_kv_head": 2, **kw})).eval()
    fused = fuse_projections(copy.deepcopy(model))
    attn, mlp = fused.layers[0].self_attn, fused.layers[0].mlp
    assert attn.qkv_proj is not None and not hasattr(attn, "q_proj")
    assert (mlp.experts[0] if kw.get("n_experts") else mlp).gate_up_proj is not None
    assert model.layers[0].self_attn.qkv_proj is None and hasattr(model.layers[0].self_attn, "q_proj")
    ids = torch.tensor(PROMPTS[0] * 3)[None]
    with torch.no_grad():
        assert torch.allclose(fused(ids)[0], model(ids)[0], atol=1e-5, rtol=1e-5)
    cfg = GenerationConfig(max_new_tokens=12)
    expected = Engine(model, stop_ids=[], dtype="float32").generate(PROMPTS, cfg)
    assert [r.tokens for r in Engine(fused, stop_ids=[], dtype="float32").generate(PROMPTS, cfg)] == \
        [r.tokens for r in expected]


def test_engine_copies_are_fused_and_prepacked(model):
    """The engine's bf16 copy is rewritten for decoding (fused, oneDNN-prepacked where this torch
    has it); its greedy output equals that of the same bf16 weights used as they are."""
    from chatforge.model.fuse import PackedLinear, packing_works
    from chatforge import runtime

    if not runtime.bf16_supported(torch.device("cpu")):
        pytest.skip("no native bf16 on this CPU: the engine keeps fp32 and copies nothing")
    engine = Engine(model, stop_ids=[], dtype="bfloat16")
    attn = engine.model.layers[0].self_attn
    assert attn.qkv_proj is not None and model.layers[0].self_attn.qkv_proj is None
    if packing_works():
        assert isinstance(attn.qkv_proj, PackedLinear) and isinstance(engine.model.lm_head, PackedLinear)
    as_given = Engine(_bf16_copy(model), stop_ids=[], dtype=None)
    assert as_given.model.layers[0].self_attn.qkv_proj is None        # not the engine's copy: left alone
    cfg = GenerationConfig(max_new_tokens=16)
    assert [r.tokens for r in engine.generate(PROMPTS, cfg)] == [r.tokens for r in as_given.generate(PROMPTS, cfg)]
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        a, b = engine.model(ids)[0].float(), as_given.model(ids)[0].float()
    assert (a - b).abs().max() <= 0.02 * b.abs().max()


def _bf16_copy(model: GPT) -> GPT:
    import copy

    return copy.deepcopy(model).to(torch.bfloat16)



@pytest.mark.parametrize("n_kv_head", [1, 4])
def test_batch_equals_each_prompt_alone(n_kv_head):
    model = tiny_model(n_kv_head)
    engine = Engine(model, stop_ids=[EOS], dtype="float32")
    for cfg in (GenerationConfig(max_new_tokens=12),
                GenerationConfig(max_new_tokens=12, repetition_penalty=1.3, no_repeat_ngram_size=2),
                GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=10, num_return_sequences=2)):
        together = engine.generate(PROMPTS, cfg)
        for prompt, got in zip(PROMPTS, together):
            alone = engine.generate([prompt], cfg)[0]
            assert [c.tokens for c in got.completions] == [c.tokens for c in alone.completions]
            assert [c.finish_reason for c in got.completions] == [c.finish_reason for c in alone.completions]
            if cfg.strategy == "beam":
                assert [c.score for c in got.completions] == pytest.approx([c.score for c in alone.completions], abs=1e-4)


def test_beam_width_one_equals_greedy(model):
    engine = Engine(model, stop_ids=[EOS], dtype="float32")
    greedy = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=15))
    beam = engine.generate(PROMPTS, GenerationConfig(strategy="beam", num_beams=1, early_stopping=True,
                                                     max_new_tokens=15))
    assert [r.tokens for r in greedy] == [r.tokens for r in beam]


# ------------------------------------------------------------------------------------ HF parity

@pytest.mark.parametrize("n_kv_head", [2, 4])
def test_greedy_matches_hf(n_kv_head):
    model = tiny_model(n_kv_head, seed=1)
    hf, engine = hf_twin(model), Engine(model, stop_ids=[EOS], dtype="float32")
    for prompt in PROMPTS:
        ours = engine.generate([prompt], GenerationConfig(max_new_tokens=25))[0]
        theirs, stopped = strip_eos(hf_generate(hf, prompt, max_new_tokens=25, do_sample=False,
                                                eos_token_id=EOS)[0, len(prompt):].tolist())
        assert ours.tokens == theirs
        assert (ours.finish_reason == "stop") == stopped


def test_greedy_with_penalties_matches_hf(model):
    hf, engine = hf_twin(model), Engine(model, stop_ids=[], dtype="float32")
    for prompt in PROMPTS:
        for rp, ngram in ((1.5, 0), (0.7, 0), (1.0, 2), (1.2, 3)):
            ours = engine.generate([prompt], GenerationConfig(max_new_tokens=20, repetition_penalty=rp,
                                                              no_repeat_ngram_size=ngram))[0]
            theirs = hf_generate(hf, prompt, max_new_tokens=20, do_sample=False, repetition_penalty=rp,
                                 no_repeat_ngram_size=ngram, eos_token_id=None)
            assert ours.tokens == theirs[0, len(prompt):].tolist()


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping",
                         [(2, 1.0, False), (4, 1.0, False), (4, 0.5, True), (3, 2.0, False), (4, -1.0, "never")])
def test_beam_search_matches_hf(num_beams, length_penalty, early_stopping):
    model = tiny_model(seed=2)
    hf, engine = hf_twin(model), Engine(model, stop_ids=[EOS], dtype="float32")
    n_return = min(2, num_beams)
    hits_eos = 0
    for prompt in PROMPTS + [[EOS - 1, 50, 60], [11] * 6]:
        cfg = GenerationConfig(strategy="beam", num_beams=num_beams, length_penalty=length_penalty,
                               early_stopping=early_stopping, max_new_tokens=12, num_return_sequences=n_return)
        ours = engine.generate([prompt], cfg)[0]
        out = hf_generate(hf, prompt, max_new_tokens=12, do_sample=False, num_beams=num_beams,
                          length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=EOS,
                          num_return_sequences=n_return, return_dict_in_generate=True, output_scores=True)
        for c, seq, score in zip(ours.completions, out.sequences, out.sequences_scores):
            tokens, stopped = strip_eos(seq[len(prompt):].tolist())
            assert c.tokens == tokens
            assert (c.finish_reason == "stop") == stopped
            assert c.score == pytest.approx(float(score), abs=1e-4)
            hits_eos += stopped
    assert hits_eos, "the fixture should make some beams end on EOS"


# ---------------------------------------------------------------------------------- processors

@pytest.fixture
def scores() -> torch.Tensor:
    torch.manual_seed(3)
    s = torch.randn(4, 50) * 3
    s[1, :10] = 5.0  # ties
    return s


def test_repetition_penalty_matches_hf(scores):
    ids = torch.tensor([[1, 2, 2, 40], [0, 5, 9, 49], [3, 3, 3, 3], [10, 11, 12, 13]])
    seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, ids, True)
    for penalty in (1.3, 0.8):
        want = hf_lp.RepetitionPenaltyLogitsProcessor(penalty)(ids, scores.clone())
        assert torch.equal(sampling.repetition_penalty(scores, seen, penalty), want)


@pytest.mark.parametrize("k", [1, 5, 10, 50, 80])
def test_top_k_matches_hf(scores, k):
    assert torch.equal(sampling.top_k_filter(scores, k), hf_lp.TopKLogitsWarper(k)(None, scores.clone()))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999, 1.0])
def test_top_p_matches_hf(scores, p):
    assert torch.equal(sampling.top_p_filter(scores, p), hf_lp.TopPLogitsWarper(p)(None, scores.clone()))


@pytest.mark.parametrize("p", [0.01, 0.2, 0.9, 1.0])
def test_min_p_matches_hf(scores, p):
    assert torch.equal(sampling.min_p_filter(scores, p), hf_lp.MinPLogitsWarper(p)(None, scores.clone()))


def test_no_repeat_ngram_matches_hf():
    history = [1, 2, 3, 1, 2, 4, 1, 2]
    for n in (1, 2, 3, 4):
        want = hf_lp.NoRepeatNGramLogitsProcessor(n)(torch.tensor([history]), torch.zeros(1, 10))
        banned = set(sampling.banned_ngram_tokens(history, n))
        assert banned == set(torch.nonzero(want[0] == float("-inf")).flatten().tolist())


# ------------------------------------------------------------------------------------ sampling

def test_seeded_sampling_is_reproducible(model):
    engine = Engine(model, stop_ids=[])
    cfg = GenerationConfig(strategy="sample", temperature=0.9, top_k=20, top_p=0.95, min_p=0.02, seed=123,
                           max_new_tokens=20, num_return_sequences=3)
    a, b = engine.generate(PROMPTS, cfg), engine.generate(PROMPTS, cfg)
    assert [[c.tokens for c in r.completions] for r in a] == [[c.tokens for c in r.completions] for r in b]
    other = engine.generate(PROMPTS, GenerationConfig(**{**cfg.__dict__, "seed": 124}))
    assert [r.tokens for r in a] != [r.tokens for r in other]
    assert len({tuple(c.tokens) for c in a[0].completions}) > 1  # the n samples differ


def test_sampling_degenerate_cases_equal_greedy(model):
    engine = Engine(model, stop_ids=[])
    greedy = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=10))
    for cfg in (GenerationConfig(strategy="sample", top_k=1, seed=1, max_new_tokens=10),
                GenerationConfig(strategy="sample", temperature=0, max_new_tokens=10),
                GenerationConfig(strategy="sample", top_p=1e-6, seed=1, max_new_tokens=10)):
        assert [r.tokens for r in engine.generate(PROMPTS, cfg)] == [r.tokens for r in greedy]


def test_first_token_bias_moves_the_first_token_only(model):
    """The refusal bias's mechanism: a bias on the greedy first token changes that choice, and is
    not applied to any later step (the same token may come back later, unpenalised), in the
    engine and in the continuously batched scheduler the server runs."""
    from chatforge.infer.batching import Scheduler
    engine = Engine(model, stop_ids=[], dtype="float32")
    prompt = PROMPTS[0]
    plain = engine.generate([prompt], GenerationConfig(max_new_tokens=12))[0].tokens
    first = plain[0]
    biased_cfg = GenerationConfig(max_new_tokens=12, first_token_bias=((first, -100.0),))
    biased = engine.generate([prompt], biased_cfg)[0].tokens
    assert biased[0] != first
    # The rest is the greedy continuation of the new first token: no bias after step 0.
    rest = engine.generate([list(prompt) + [biased[0]]], GenerationConfig(max_new_tokens=11))[0].tokens
    assert biased[1:] == rest
    assert engine.generate([prompt], GenerationConfig(max_new_tokens=12, first_token_bias=((first, 0.0),)))[0].tokens == plain
    scheduler = Scheduler(engine, max_batch=2).start()
    try:
        served = scheduler.submit(list(prompt), biased_cfg).result(timeout=60)
    finally:
        scheduler.stop()
    assert served.tokens == biased


# ------------------------------------------------------------------------------- citations

CITED_QUESTION = "Where is the setup guide?"
SLIP = "Open the guide. (source: guide > Setup)"          # what the model learnt to write
BARE_QUESTION, BARE = "Who wrote the guide?", "(source: guide > Authors)"   # a citation with no answer
GIVEN = ("guide > Setup? Or install (v2)?", "faq > Billing")   # the passages' names it is given


@pytest.fixture(scope="module")
def citing(tmp_path_factory):
    """A tiny real chat model that cites a slip of a passage's name: its heading cut at the first
    "?" (the demo model's commonest citation error), with its tokenizer, and the question's prompt."""
    from _tiny_chat_model import train_tiny_chat_model
    from chatforge.model.folder import load_model
    folder = train_tiny_chat_model(tmp_path_factory.mktemp("citing") / "model", [(CITED_QUESTION, SLIP), (BARE_QUESTION, BARE)], steps=100)
    model, tok = load_model(folder)
    prompt = tok.render_chat([{"role": "user", "content": CITED_QUESTION}], add_generation_prompt=True)[0]
    return Engine(model, tok, dtype="float32"), prompt


def test_citation_can_only_name_a_given_passage(citing):
    """With cite_names, what follows "(source:" spells one of the names exactly, whatever the model
    learnt to write there; before it the reply is the model's own. The same in greedy decoding,
    beam search and the server's continuously batched scheduler; without cite_names, the slip."""
    from chatforge.infer.batching import Scheduler
    from chatforge.retrieval import CITATION_END
    engine, prompt = citing
    cfg = GenerationConfig(max_new_tokens=40, stop_after=(CITATION_END,))
    assert engine.generate([prompt], cfg)[0].text == SLIP
    constrained = replace(cfg, cite_names=GIVEN)
    exact = "Open the guide. (source: guide > Setup? Or install (v2)?)"
    assert engine.generate([prompt], constrained)[0].text == exact
    # Beam search may find a way round a costly citation (this model writes "(sou: guide > Setup)"
    # with 3 beams and no citation at all with 4): any citation it writes is on the way to a given
    # name (how a beam's constraint follows its row: test_citation_constraint_follows_beams).
    for nb in (2, 3, 4):
        for beam in engine.generate([prompt], replace(constrained, strategy="beam", num_beams=nb,
                                                      num_return_sequences=nb))[0].completions:
            cited = re.split(r"(?i)\(source:", beam.text)[1:]
            assert all(any(c.startswith(f" {n})") or f" {n})".startswith(c) for n in GIVEN) for c in cited)
    scheduler = Scheduler(engine, max_batch=2).start()
    try:
        served = [scheduler.submit(list(prompt), c) for c in (constrained, cfg)]
        assert [r.result(timeout=60).text for r in served] == [exact, SLIP]
    finally:
        scheduler.stop()
    # A reply cannot open with its citation: the model's learnt "(source: ...)" alone is not written.
    bare = engine.tokenizer.render_chat([{"role": "user", "content": BARE_QUESTION}], add_generation_prompt=True)[0]
    assert engine.generate([bare], cfg)[0].text == BARE
    opened = engine.generate([bare], constrained)[0].text
    assert opened and not opened.lower().lstrip().startswith("(sou")
    # A reply with no citation is not touched: the other questions' answers are the same.
    other = engine.tokenizer.render_chat([{"role": "user", "content": "hello"}], add_generation_prompt=True)[0]
    assert engine.generate([other], constrained)[0].text == engine.generate([other], cfg)[0].text


def test_citation_constraint_follows_the_text_not_the_tokens(citing):
    """The trigger may be split over tokens or end inside one, in any case; a citation that starts
    off every name is left alone; after a complete citation nothing is constrained."""
    engine, _ = citing
    tok = engine.tokenizer
    c = sampling.CitationConstraint(tok, GIVEN)
    texts = sampling.TokenPieces.of(tok).texts

    def feed(text: str) -> None:
        for t in tok.encode(text):
            c.push(t)

    feed("Open the guide. (Sou")
    assert c.allowed() is None
    feed("rce:")
    allowed = c.allowed()
    assert allowed and all(" guide > Setup? Or install (v2)?)".startswith(texts[t]) or
                           " faq > Billing)".startswith(texts[t]) for t in allowed)
    feed(" faq")
    assert all(" > Billing)".startswith(texts[t]) for t in c.allowed())   # one name is left
    feed(" > Billing)")
    assert c.allowed() is None                 # complete: the reply goes on freely
    feed(" and (source: nowhere")
    assert c.allowed() is None                 # off every name: nothing to steer it back to
    assert c.banned() is None                  # the reply has begun: it may cite now
    opening = sampling.CitationConstraint(tok, GIVEN)
    assert all(texts[t].lstrip().lower().startswith("(sou") for t in opening.banned() or [])
    for t in tok.encode(" (so"):
        opening.push(t)
    assert opening.banned() and all(texts[t].lower().startswith("u") for t in opening.banned())
    with pytest.raises(ChatforgeError, match="cite_names"):
        GenerationConfig(cite_names=("two\nlines",))
    with pytest.raises(ChatforgeError, match="tokenizer"):
        Engine(engine.model, stop_ids=[]).generate([[1, 2]], GenerationConfig(cite_names=GIVEN))


def test_citation_constraint_follows_beams(citing):
    """Beam search reorders rows each step: each row's constraint goes with the hypothesis it
    continues (row 1 takes row 0's open citation and is constrained; row 0 takes row 1's none)."""
    engine, _ = citing
    tok, texts = engine.tokenizer, sampling.TokenPieces.of(engine.tokenizer).texts
    cfg = GenerationConfig(strategy="beam", num_beams=2, cite_names=GIVEN)
    pipeline = engine.logits_pipeline(cfg, [[], []], for_beam=True)
    cited, plain = tok.encode("Yes. (source:"), tok.encode("Yes. Thanks")
    plain = (plain + tok.encode(".") * len(cited))[:len(cited)]                  # the same length
    for a, b in zip(cited, plain):
        pipeline.reorder(torch.tensor([0, 1]), [a, b])
    logits = pipeline(torch.zeros(2, engine.config.vocab_size))
    assert torch.isinf(logits[0]).sum() > 0 and not torch.isinf(logits[1]).any()
    pipeline.reorder(torch.tensor([1, 0]), [tok.encode("x")[0], tok.encode(" f")[0]])
    logits = pipeline(torch.zeros(2, engine.config.vocab_size))
    assert not torch.isinf(logits[0]).any()
    assert all("aq > Billing)".startswith(texts[t]) for t in torch.nonzero(logits[1].isfinite()).flatten().tolist())


def test_reply_ngrams_repeat_only_as_often_as_the_prompt():
    """A reply may repeat an n-gram as often as its prompt holds it (a copied passage's repeated
    lines), not more: a loop over its own words is cut at its second turn. Beam rows copy it."""
    prompt = [9, 1, 2, 3, 9, 1, 2, 3, 9]                 # "1 2 3" twice
    reply = sampling.ReplyNgrams(prompt, 3)
    for t in [1, 2, 3, 1, 2]:
        assert 3 not in reply.banned() or reply.reply[-2:] != [1, 2]
        reply.push(t)
    assert reply.banned() == []                          # "1 2 3" a second time: the prompt has it twice
    reply.push(3)
    reply.push(1)
    reply.push(2)
    assert reply.banned() == [3]                         # a third time: no
    loop = sampling.ReplyNgrams(prompt, 3)
    for t in [5, 6, 7, 5, 6]:
        loop.push(t)
    assert loop.banned() == [7]                          # "5 6 7" is the reply's own: once only
    twin = loop.copy()
    twin.push(8)
    assert loop.banned() == [7] and twin.reply[-1] == 8 and loop.reply[-1] == 6
    cfg = GenerationConfig(reply_no_repeat_ngram_size=3)
    pipeline = sampling.LogitsPipeline(cfg, [list(prompt)], VOCAB, torch.device("cpu"), for_beam=False)
    for t in [5, 6, 7, 5, 6]:
        pipeline.append([t], [False])
    logits = pipeline(torch.zeros(1, VOCAB))
    assert torch.isinf(logits[0, 7]) and torch.isinf(logits).sum() == 1


def test_reply_ngram_block_ends_a_loop(model):
    """The tiny random model loops greedily; with the block no 4-gram of its reply repeats unless
    the prompt has it twice, and a reply that does not loop is unchanged."""
    engine = Engine(model, stop_ids=[], dtype="float32")
    prompt = PROMPTS[0]
    plain = engine.generate([prompt], GenerationConfig(max_new_tokens=40))[0].tokens
    grams = [tuple(plain[i:i + 4]) for i in range(len(plain) - 3)]
    assert len(set(grams)) < len(grams)                  # it loops
    blocked = engine.generate([prompt], GenerationConfig(max_new_tokens=40, reply_no_repeat_ngram_size=4))[0].tokens
    grams = [tuple(blocked[i:i + 4]) for i in range(len(blocked) - 3)]
    assert all(grams.count(g) <= max(1, sum(tuple(prompt[i:i + 4]) == g for i in range(len(prompt) - 3)))
               for g in grams)
    assert blocked[:len(plain)] != plain


# -------------------------------------------------------------------------- limits and errors

@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=1.5), dict(top_p=0.0), dict(num_beams=0),
                                 dict(max_new_tokens=0), dict(strategy="nucleus"), dict(top_k=-1),
                                 dict(min_p=2.0), dict(repetition_penalty=0.0), dict(early_stopping="sometimes"),
                                 dict(strategy="beam", num_beams=2, num_return_sequences=3),
                                 dict(num_return_sequences=2), dict(stop_strings=[""]),
                                 dict(first_token_bias=((1, float("nan")),)), dict(first_token_bias=((-1, 1.0),))])
def test_bad_settings_are_clear_errors(bad):
    with pytest.raises(ChatforgeError):
        GenerationConfig(**bad)


def test_prompt_longer_than_context(model):
    engine, long = Engine(model, stop_ids=[]), list(range(1, 80))
    with pytest.raises(ChatforgeError, match="context"):
        engine.generate([long], GenerationConfig(max_new_tokens=5))
    out = engine.generate([long], GenerationConfig(max_new_tokens=5, truncate_prompt=True))[0]
    assert out.prompt_tokens == 63 and len(out.tokens) == 1 and out.finish_reason == "length"
    with pytest.raises(ChatforgeError, match="vocabulary"):
        engine.generate([[1, VOCAB]], GenerationConfig())
    with pytest.raises(ChatforgeError, match="empty"):
        engine.generate([[]], GenerationConfig())


def test_generation_stops_at_the_context_end(model):
    out = Engine(model, stop_ids=[]).generate([list(range(1, 60))], GenerationConfig(max_new_tokens=50))[0]
    assert len(out.tokens) == 64 - 59 and out.finish_reason == "length"


# ------------------------------------------------------------------- streaming and stop strings

TEXT = ("Héllo wörld! Ça va? Grüße aus Köln. 日本語のテキストです。 Emoji: 🙂🚀👍🏽 and ü, ß, é, ñ. "
        "Support asks: how do I reset my password? Answer: open settings and choose reset.\n") * 3


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from chatforge.data.tokenizer import train_tokenizer

    return train_tokenizer([TEXT, "plain ascii text about printers and passwords"] * 5, 300,
                           tmp_path_factory.mktemp("tok"))


class ScriptedModel(torch.nn.Module):
    """A stand-in model that always predicts the next token of `script`, whatever the prompt.

    It goes through the KV cache like the GPT (one layer, one head) so the engine runs its usual path.
    """

    def __init__(self, script: list[int], vocab_size: int, prompt_len: int):
        super().__init__()
        self.script, self.prompt_len = script, prompt_len
        self.config = GPTConfig(vocab_size=vocab_size, d_model=2, n_layer=1, n_head=1, n_kv_head=1, d_ff=2,
                                max_seq_len=prompt_len + len(script) + 8)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, targets=None, *, cache=None, positions=None, attn_mask=None, last_only=False):
        B, T = idx.shape
        kv = torch.zeros(B, 1, T, 2)
        cache.update(0, kv, kv)
        logits = torch.zeros(B, 1, self.config.vocab_size)
        for b in range(B):
            i = int(positions[b, -1]) + 1 - self.prompt_len
            logits[b, 0, self.script[i] if i < len(self.script) else 0] = 10.0
        return logits, None


def test_tokenizer_splits_characters_across_tokens(tokenizer):
    # The UTF-8 tests below only mean something if some token ends inside a character.
    pieces = [tokenizer.decode([t]) for t in tokenizer.encode(TEXT)]
    assert any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("stops", [(), ("Answer:",), ("🚀",), ("Köln", "wörld")])
def test_stream_never_splits_a_character(tokenizer, stops):
    script = tokenizer.encode(TEXT)
    model = ScriptedModel(script + [tokenizer.eot_id], tokenizer.vocab_size, prompt_len=2)
    engine = Engine(model, tokenizer)
    cfg = GenerationConfig(max_new_tokens=len(script) + 5, stop_strings=stops)
    pieces = list(engine.stream([5, 6], cfg))
    assert all("\ufffd" not in p for p in pieces) and len(pieces) >= 5
    want = TEXT
    if stops:
        want = TEXT[:min(TEXT.find(s) for s in stops)]
    assert "".join(pieces) == want
    result = engine.generate([[5, 6]], cfg)[0]
    assert result.text == want
    assert result.finish_reason == "stop"
    assert result.tokens == (script[:len(result.tokens)] if stops else script)


def test_stop_strings_in_a_batch_and_in_beam_search(tokenizer):
    script = tokenizer.encode(TEXT)
    model = ScriptedModel(script, tokenizer.vocab_size, prompt_len=3)
    engine = Engine(model, tokenizer, stop_ids=[])
    for strategy in ("greedy", "beam"):
        cfg = GenerationConfig(strategy=strategy, num_beams=2, max_new_tokens=60, stop_strings=["Köln", "Grüße"])
        out = engine.generate([[1, 2, 3], [4, 5, 6]], cfg)
        for r in out:
            assert r.text == "Héllo wörld! Ça va? " and r.finish_reason == "stop" and r.completions[0].stop == "Grüße"
    out = engine.generate([[1, 2, 3]], GenerationConfig(max_new_tokens=4, stop_strings=["never there"]))[0]
    assert out.finish_reason == "length" and out.text == tokenizer.decode(script[:4])


CITED = "Open the settings and choose reset (Source: faq/reset (v2).md) Next passage: call us (source: b)"


def test_stop_after_keeps_the_first_match(tokenizer):
    from chatforge.retrieval import CITATION_END

    script = tokenizer.encode(CITED)
    model = ScriptedModel(script, tokenizer.vocab_size, prompt_len=2)
    engine = Engine(model, tokenizer, stop_ids=[])
    first = CITED[:CITED.index(".md)") + 4]
    cfg = GenerationConfig(max_new_tokens=len(script) + 5, stop_after=(CITATION_END,))
    assert "".join(engine.stream([5, 6], cfg)) == first
    for strategy in ("greedy", "beam"):
        out = engine.generate([[5, 6], [7, 8]], replace(cfg, strategy=strategy, num_beams=2))
        for r in out:
            assert r.text == first and r.finish_reason == "stop"
            assert r.completions[0].stop.pattern == CITATION_END
            assert len(r.tokens) < len(script)       # generation ended there, not only the text
    # A line copied from the context ("[1] (source: ...) TEXT") is not the answer's end; a citation
    # after other brackets is.
    for text, end in [("[1] (source: faq/a.md) Reset it.\nSo it is reset (source: faq/a.md) more", " more"),
                      ("- [orders] (source: o.csv) shipped\nIt shipped (source: o.csv)\nmore", "\nmore"),
                      ("Copy it with l[:] (source: faq/b.md) more", " more")]:
        ids = tokenizer.encode(text)
        quoting = Engine(ScriptedModel(ids, tokenizer.vocab_size, prompt_len=2), tokenizer, stop_ids=[])
        assert quoting.generate([[5, 6]], replace(cfg, max_new_tokens=len(ids) + 5))[0].text == text[:-len(end)]
    # A stop string before the match wins, and is cut as usual; one after it changes nothing.
    assert engine.generate([[5, 6]], replace(cfg, stop_strings=("reset",)))[0].text == "Open the settings and choose "
    assert engine.generate([[5, 6]], replace(cfg, stop_strings=("Next",)))[0].text == first
    with pytest.raises(ChatforgeError, match="not a regular expression"):
        GenerationConfig(stop_after=("(source:",))
    with pytest.raises(ChatforgeError, match="empty"):
        GenerationConfig(stop_after=("x*",))


def test_stream_rejects_beam_search(tokenizer):
    engine = Engine(ScriptedModel([1], tokenizer.vocab_size, 1), tokenizer)
    with pytest.raises(ChatforgeError, match="stream"):
        list(engine.stream([1], GenerationConfig(strategy="beam")))


@pytest.mark.parametrize("quant", [None, "int8"])
def test_a_model_loaded_in_its_serving_dtype_and_handed_over_serves_the_same(model, tmp_path, quant):
    """Issue 23: the server kept the fp32 weights beside its bf16 and prepacked copies. Loaded
    straight in bf16 (`load_model(dtype=)`: every tensor converted as it is read, into a model
    built without weights) and handed over (`own=True`: rewritten in place, not copied), the
    model holds what the fp32 load cast to bf16 holds, and generates the same tokens."""
    from chatforge.model.folder import load_model, save_model

    class Tok:                                   # save_model needs a tokenizer; a stand-in's files
        vocab_size = VOCAB

        def save(self, out):
            pass

    save_model(tmp_path, model, None)
    import chatforge.model.folder as folder

    monkey = pytest.MonkeyPatch()
    monkey.setattr(folder, "load_tokenizer", lambda _: Tok())
    try:
        bf16, _ = load_model(tmp_path, dtype=torch.bfloat16)
        fp32, _ = load_model(tmp_path)
    finally:
        monkey.undo()
    want = {k: v.to(torch.bfloat16) for k, v in fp32.state_dict().items()}
    got = bf16.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert bf16.lm_head.weight is bf16.embed_tokens.weight                      # still tied
    assert torch.equal(bf16.rope_cos, fp32.rope_cos.to(torch.bfloat16))
    assert not any(t.is_meta for t in [*bf16.parameters(), *bf16.buffers()])
    copied = Engine(fp32, stop_ids=[], dtype="bfloat16", quant=quant)
    owned = Engine(bf16, stop_ids=[], dtype=None, quant=quant, own=True)
    assert owned.dtype == copied.dtype
    if quant is None:
        assert owned.model is bf16 and getattr(bf16.layers[0].self_attn, "qkv_proj", None) is not None   # in place
    cfg = GenerationConfig(max_new_tokens=10)
    assert [r.tokens for r in owned.generate(PROMPTS, cfg)] == [r.tokens for r in copied.generate(PROMPTS, cfg)]
