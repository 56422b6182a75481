"""Retrieval: structured passages, BM25 with a heading field, the index cache, the grounded prompt and SFT examples."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from chatforge.retrieval import (GROUNDED_SYSTEM_PROMPT, MAX_WORDS, NOT_FOUND_REPLY, Passage, PassageIndex,
                                 context_sources, format_context, grounded_messages, split_passages,
                                 strip_citation)
from chatforge.retrieval.examples import grounded_sft_examples, section_sft_examples
from chatforge.retrieval.passages import markup_headings

BILLING = """# Billing

Invoices are issued on the first day of every month and sent to the account owner by e-mail.
You can pay invoices by credit card or by bank transfer; card payments are charged automatically.

## Refunds

A refund is possible within 30 days of a payment. Open Billing, choose the invoice and press
Request refund; the money reaches your card within five working days.
"""

NETWORK = """# Network setup

The router must forward TCP port 8443 to the backup appliance so that remote agents can connect.
Firewalls that inspect TLS traffic break the agent handshake; add an exception for the appliance.

## Proxy

Agents honour the HTTPS_PROXY environment variable. Authentication with NTLM proxies is not supported.
"""

ACCOUNTS = """# Accounts

To reset a forgotten password, open the sign-in page and click Forgot password. A reset link is
mailed to you and expires after one hour.

## Two-factor authentication

Enable two-factor authentication under Profile, Security. Scan the QR code with an authenticator app.
"""


def make_docs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "billing.md").write_text(BILLING)
    (folder / "network.md").write_text(NETWORK)
    (folder / "accounts.txt").write_text(ACCOUNTS)
    return folder


@pytest.fixture()
def docs(tmp_path: Path) -> Path:
    return make_docs(tmp_path / "docs")


@pytest.mark.parametrize("question, doc", [
    ("How can I get a refund for an invoice?", "docs/billing.md"),
    ("Which port does the router need to forward?", "docs/network.md"),
    ("I forgot my password, how do I reset it?", "docs/accounts.txt"),
    ("Does the agent work behind an NTLM proxy?", "docs/network.md"),
    ("How do I turn on two-factor authentication?", "docs/accounts.txt"),
])
def test_search_finds_the_right_document(docs, tmp_path, question, doc):
    index = PassageIndex.build([docs], tmp_path / "cache")
    hits = index.search(question, k=2)
    assert hits[0].doc == doc
    assert hits[0].score > 0 and hits[0].score >= hits[1].score
    assert hits[0].source.startswith(doc)


def test_passages_carry_title_and_section(docs, tmp_path):
    index = PassageIndex.build([docs], tmp_path / "cache")
    sources = {p.source for p in index.passages}
    assert "docs/billing.md > Billing > Refunds" in sources           # DOC > TITLE > SECTION
    assert "docs/network.md > Network setup > Proxy" in sources
    assert "docs/billing.md > Billing" in sources                     # the intro: title = section, once
    refunds = next(p for p in index.passages if p.section == "Refunds")
    assert refunds.title == "Billing" and refunds.doc == "docs/billing.md"
    assert refunds.text.startswith("A refund is possible") and "Refunds" not in refunds.text
    assert {p.doc for p in index.passages} == {"docs/billing.md", "docs/network.md", "docs/accounts.txt"}


def words(n: int, word: str = "backup") -> str:
    return " ".join([word] * n)


def test_long_section_is_cut_between_paragraphs_into_even_passages():
    sentence = "The backup agent copies changed blocks to the appliance every hour. "     # 11 words
    paragraphs = [f"Paragraph p{i} starts here. " + sentence * 6 for i in range(10)]  # 70 words each
    text = "Overview\n\n" + "\n\n".join(paragraphs) + "\n\n" + sentence * 60          # + one of 660 words
    passages = split_passages(text, "manual.txt")
    sizes = [len(p.text.split()) for p in passages]
    assert sum(sizes) == 70 * 10 + 660                                              # nothing lost
    assert max(sizes) <= MAX_WORDS and min(sizes) >= 0.75 * max(sizes)              # even, no fragments
    assert all(p.source == "manual.txt > Overview" and p.section == p.title == "Overview" for p in passages)
    for para in paragraphs:                                                          # cut between paragraphs
        assert sum(para.strip() in p.text for p in passages) == 1
    assert all(p.text.endswith("hour.") for p in passages)                          # ... and sentences


def test_short_sections_stay_whole():
    text = "Guide\n\nInstalling\n\n" + words(30) + "\n\n" + words(40) + "\n\nRemoving\n\n" + words(5, "remove")
    passages = split_passages(text, "guide.txt")
    assert [(p.section, len(p.text.split())) for p in passages] == [("Installing", 70), ("Removing", 5)]
    assert {p.title for p in passages} == {"Guide"}


def test_numbered_steps_stay_together():
    steps = "\n\n".join(f"{i}. Step {i}: " + words(20, "press") + "." for i in range(1, 9))   # 8 x 23 words
    text = ("Restoring\n\n" + words(60, "prose") + ".\n\nTo restore a whole machine:\n\n" + steps
            + "\n\n" + words(60, "after") + ".")
    passages = split_passages(text, "restore.txt")
    assert len(passages) > 1 and all(len(p.text.split()) <= MAX_WORDS for p in passages)
    with_steps = [p for p in passages if "Step 1:" in p.text]
    assert len(with_steps) == 1
    assert all(f"Step {i}:" in with_steps[0].text for i in range(1, 9))
    assert with_steps[0].text.startswith("To restore a whole machine:")      # with the line that introduces them

    bullets = "- open Settings\n  (the gear icon)\n- press Save"          # items and their indented lines
    (p,) = split_passages("Tips\n\nDo this:\n\n" + bullets + "\n\nDone.", "tips.txt")
    assert p.text == "Do this:\n" + bullets + "\nDone."

def test_asciidoc_headings_and_no_code_lines_taken_for_headings():
    # git's manuals: "[[anchor]]" over "=== Title"; a short line in a listing is not a heading.
    text = ("= User Manual\n\n[preface]\n== Introduction\n\n" + words(30, "intro") + ".\n\n"
            "[[creating-tags]]\n=== Creating tags\n\n" + words(20, "tag") + ":\n\n"
            "------\n$ git tag stable-1 1b2e1d63ff\n------\n\nExit codes\n\n" + words(10, "more") + ".")
    passages = split_passages(text, "user-manual.txt")
    assert [p.section for p in passages] == ["Introduction", "Creating tags"]
    assert passages[0].title == "User Manual"
    assert "Exit codes" in passages[1].text and "[[creating-tags]]" not in passages[1].text



FAQ = """# Tidewater FAQ

Tidewater keeps copies of your files. This page answers common questions.

## How do I restore a deleted folder?

{answer}

## Is my data encrypted?

Yes, with AES-256 on your device before it leaves it.

## Contact

Write to the support team from the console.
"""


def test_faq_entry_is_one_passage(tmp_path):
    answer = "\n\n".join(f"Paragraph {i} of the restore procedure. " + words(60, "restore") for i in range(5))
    (tmp_path / "faq").mkdir()
    (tmp_path / "faq" / "faq.md").write_text(FAQ.format(answer=answer))
    index = PassageIndex.build([tmp_path / "faq"], tmp_path / "cache")
    by_section = {p.section: p for p in index.passages}
    entry = by_section["How do I restore a deleted folder?"]
    assert len(entry.text.split()) > MAX_WORDS                       # the whole answer, longer than prose passages
    assert entry.text.startswith("Paragraph 0") and "Paragraph 4" in entry.text
    assert entry.source == "faq/faq.md > Tidewater FAQ > How do I restore a deleted folder?"
    assert by_section["Is my data encrypted?"].text == "Yes, with AES-256 on your device before it leaves it."
    # The FAQ's other sections (its introduction, a non-question heading) are indexed too.
    assert by_section["Tidewater FAQ"].text.startswith("Tidewater keeps copies")
    assert by_section["Contact"].text == "Write to the support team from the console."
    assert len(index) == 4
    assert index.search("Is my data encrypted?", 1)[0].section == "Is my data encrypted?"


def test_markup_declares_the_headings():
    rst = "==========\nUser guide\n==========\n\nIntro text.\n\nBackups\n-------\n\nThis prints::\n\n    x\n"
    assert markup_headings(rst, "rst") == {"User guide", "Backups"}
    pod = "=head1 NAME\n\nbackup - the B<backup> tool\n\n=head2 Running C<backup>\n\n=item This prints\n"
    assert markup_headings(pod, "pod") == {"NAME", "Running backup"}
    page = "<html><head><title>Help</title></head><body><h2>Disk <b>full</b></h2><p>Short line</p></body></html>"
    assert markup_headings(page, "html") == {"Help", "Disk full"}
    md = "# Guide\n\n```\n# not a heading\n```\n\nSetup\n=====\n\ntext\n"
    assert markup_headings(md, "md") == {"Guide", "Setup"}


def test_pod_title_and_headings(tmp_path):
    pod = ("=head1 NAME\n\nbackuptool - keep copies of your files\n\n=head1 DESCRIPTION\n\n"
           "The tool copies files every night.\n\nThis prints\n\n    backuptool --list\n\n"
           "=head2 Restoring files\n\nUse the restore command with the name of the snapshot.\n")
    (tmp_path / "backuptool.pod").write_text(pod)
    passages = PassageIndex.build([tmp_path / "backuptool.pod"], tmp_path / "cache").passages
    assert [p.section for p in passages] == ["DESCRIPTION", "Restoring files"]  # "This prints" is no heading
    assert {p.title for p in passages} == {"keep copies of your files"}           # NAME, without "name - "
    assert "This prints" in passages[0].text and "backuptool --list" in passages[0].text
    assert passages[1].source == "backuptool.pod > keep copies of your files > Restoring files"


def test_ranking_uses_headings(docs, tmp_path):
    (docs / "relay.md").write_text(
        "# Appliance administration\n\n## Configuring the Zephyr relay\n\n"
        "Open the settings page of the appliance and enter the host name and the port. Press Save.\n\n"
        "## Changing the admin password\n\nOpen the settings page of the appliance, type the old and the new "
        "password and press Save. The relay host name and port stay as they are.\n")
    index = PassageIndex.build([docs], tmp_path / "cache")
    # "zephyr" and "relay" are words of a heading only (and of a title: "administration"),
    # not of the text under it.
    hit = index.search("How do I configure the Zephyr relay?", 1)[0]
    assert hit.section == "Configuring the Zephyr relay" and "Zephyr" not in hit.text
    assert index.search("appliance administration", 1)[0].doc == "docs/relay.md"
    # Without the heading field the other section, which has "relay" in its text, competes.
    index.heading_weight = 0.0
    plain = index.scores("How do I configure the Zephyr relay?")
    index.heading_weight = 1.0
    weighted = index.scores("How do I configure the Zephyr relay?")
    assert weighted[hit.id] - plain[hit.id] > 0 and (weighted > plain).sum() >= 1


def test_cache_is_reused_and_rebuilt_on_change(docs, tmp_path):
    cache = tmp_path / "cache"
    first = PassageIndex.load_or_build([docs], cache)
    (folder,) = list(cache.iterdir())
    assert folder.name.startswith("passages-")
    assert {"meta.json", "passages.jsonl", "bm25", "bm25-heading"} <= {p.name for p in folder.iterdir()}
    assert not list(folder.rglob("*.pkl")) and not list(folder.rglob("*.pickle"))
    stamp = (folder / "meta.json").stat().st_mtime_ns
    again = PassageIndex.load_or_build([docs], cache)
    assert (folder / "meta.json").stat().st_mtime_ns == stamp          # not rebuilt
    assert [(p.text, p.source, p.title, p.section) for p in again.passages] == \
        [(p.text, p.source, p.title, p.section) for p in first.passages]
    assert again.search("refund", 1)[0].doc == "docs/billing.md"
    assert again.search("Two-factor", 1)[0].id == first.search("Two-factor", 1)[0].id   # heading field loaded

    (docs / "shipping.md").write_text("# Shipping\n\nParcels with replacement disks ship from Rotterdam by courier.\n")
    changed = PassageIndex.load_or_build([docs], cache)
    assert "docs/shipping.md" in changed.docs
    assert changed.search("Where do replacement disks ship from?", 1)[0].doc == "docs/shipping.md"
    assert len(list(cache.iterdir())) == 1                             # rebuilt in place

    # An edit that keeps the size still changes the mtime.
    time.sleep(0.01)
    text = (docs / "shipping.md").read_text().replace("Rotterdam", "Amsterda")
    (docs / "shipping.md").write_text(text + " " * (len("Rotterdam") - len("Amsterda")))
    os.utime(docs / "shipping.md", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert "Amsterda" in PassageIndex.load_or_build([docs], cache).search("replacement disks", 1)[0].text

    # Another set of inputs is another index; a build drops the indexes whose documents are gone.
    other = make_docs(tmp_path / "other")
    PassageIndex.load_or_build([other], cache)
    assert len(list(cache.iterdir())) == 2
    shutil.rmtree(other)
    PassageIndex.load_or_build([docs / "billing.md"], cache)
    assert len(list(cache.iterdir())) == 2 and folder.is_dir()
    assert json.loads((folder / "meta.json").read_text())["paths"] == [str(docs.resolve())]


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_default_cache_is_chatforges_and_nothing_is_written_beside_the_docs(tmp_path, monkeypatch):
    docs = make_docs(tmp_path / "share" / "docs")
    cache = tmp_path / "chatforge-cache"
    monkeypatch.setenv("CHATFORGE_CACHE", str(cache))
    before = tree(docs.parent)
    for p in [docs, *docs.iterdir()]:
        p.chmod(0o555 if p.is_dir() else 0o444)                          # a read-only share
    try:
        index = PassageIndex.load_or_build([docs])
        assert index.search("refund", 1)[0].doc == "docs/billing.md"
    finally:
        for p in [docs, *docs.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert tree(docs.parent) == before                                  # nothing beside the documents
    (folder,) = list((cache / "index").iterdir())
    assert folder.name.startswith("passages-") and (folder / "meta.json").is_file()
    stamp = (folder / "meta.json").stat().st_mtime_ns
    PassageIndex.load_or_build([docs], None)
    assert (folder / "meta.json").stat().st_mtime_ns == stamp           # reused


def test_an_unwritable_cache_still_gives_an_index(docs, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    index = PassageIndex.load_or_build([docs], blocker)
    assert index.search("refund", 1)[0].doc == "docs/billing.md"
    assert blocker.is_file()


def test_missing_docs_is_a_clear_error(tmp_path):
    from chatforge.errors import ChatforgeError

    with pytest.raises(ChatforgeError, match="does not exist"):
        PassageIndex.build([tmp_path / "nope"], tmp_path / "cache")


def test_prompt_format_and_budget():
    passages = [Passage("Refunds are possible within 30 days. " * 20, "billing.md > Refunds", doc="billing.md"),
                Passage("Port 8443 must be open.", "network.md", doc="network.md")]
    msgs = grounded_messages("How do refunds work?", passages, max_context_tokens=400)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == GROUNDED_SYSTEM_PROMPT
    user = msgs[1]["content"]
    assert user.startswith("Context:\n[1] (source: billing.md > Refunds) Refunds are possible")
    assert "\n[2] (source: network.md) Port 8443 must be open." in user
    assert user.endswith("\n\nQuestion: How do refunds work?")
    # What a reply may cite, read back from the prompt (eval constrains citations with it).
    named = [*passages, Passage("Version 2 (beta) ships in May.", "news.md > Releases (2024) > v2", doc="news.md")]
    assert context_sources(grounded_messages("When?", named)[1]["content"]) == [p.source for p in named]
    assert context_sources("Context:\n(none)\n\nQuestion: [1] (source: x) y") == []

    for budget in (40, 80, 120):
        block = format_context(passages, max_context_tokens=budget)
        assert (len(block) + 3) // 4 <= budget + 1          # ~4 characters a token
        assert block.startswith("Context:\n[1] (source: billing.md > Refunds)") and block.endswith("...")

    class WordTokenizer:   # one token a word: the budget uses the tokenizer when one is given
        def encode(self, text):
            return text.split()

    block = format_context(passages, max_context_tokens=50, tokenizer=WordTokenizer())
    assert len(block.split()) <= 50 and "[1]" in block

    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]
    msgs = grounded_messages("And refunds?", [], system="Be brief.", history=history)
    assert msgs[0] == {"role": "system", "content": "Be brief."} and msgs[1:3] == history
    assert msgs[-1]["content"] == "Context:\n(none)\n\nQuestion: And refunds?"


def test_strip_citation():
    assert strip_citation("Press Request refund. (source: docs/billing.md > Refunds)") == "Press Request refund."
    assert strip_citation("No citation here.") == "No citation here."


QA = [
    ("How can I get a refund?", "Open Billing, choose the invoice and press Request refund.", "docs/billing.md"),
    ("When are invoices issued?", "On the first day of every month.", "docs/billing.md"),
    ("Which port must be forwarded?", "TCP port 8443, to the backup appliance.", "docs/network.md"),
    ("Are NTLM proxies supported?", "No, authentication with NTLM proxies is not supported.", "docs/network.md"),
    ("How do I reset my password?", "Click Forgot password on the sign-in page.", "docs/accounts.txt"),
    ("How long is a reset link valid?", "One hour.", "docs/accounts.txt"),
    ("How do I enable two-factor authentication?", "Under Profile, Security; scan the QR code.", "docs/accounts.txt"),
]


def test_grounded_sft_examples(docs, tmp_path):
    index = PassageIndex.build([docs], tmp_path / "cache")
    pairs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "source": s}
             for q, a, s in QA * 3]
    pairs.append({"question": "Unrelated?", "answer": "Yes.", "source": "elsewhere/chat.csv"})   # not indexed
    examples = grounded_sft_examples(pairs, index, k=2, missing_fraction=0.15, seed=1)
    assert len(examples) == len(QA) * 3
    missing = [e for e in examples if e["missing"]]
    assert len(missing) == round(0.15 * len(QA) * 3)
    for e, (q, a, s) in zip(examples, QA * 3):
        system, user, reply = e["messages"]
        assert system["content"] == GROUNDED_SYSTEM_PROMPT and reply["role"] == "assistant"
        assert user["content"].startswith("Context:\n[1] (source: ")
        assert user["content"].endswith(f"Question: {q}")
        if e["missing"]:
            assert reply["content"] == NOT_FOUND_REPLY
            assert f"(source: {s}" not in user["content"]          # every passage of the source removed
        else:
            assert reply["content"].startswith(a + " (source: " + s)
            assert reply["content"].endswith(")")
            cited = reply["content"][len(a) + len(" (source: "):-1]
            assert f"(source: {cited})" in user["content"]          # the cited passage is in the context
    # Deterministic for a seed, different for another.
    again = grounded_sft_examples(pairs, index, k=2, missing_fraction=0.15, seed=1)
    assert again == examples
    other = grounded_sft_examples(pairs, index, k=2, missing_fraction=0.15, seed=2)
    assert [e["missing"] for e in other] != [e["missing"] for e in examples]


def test_hard_refusals_keep_the_topic_but_not_the_answer(docs, tmp_path):
    # --hard-missing: the not-found examples see the best passages of every document but the
    # answer's own, neighbours on the same topic, never a passage that holds the answer.
    index = PassageIndex.build([docs], tmp_path / "cache")
    pairs = [{"question": q, "answer": a, "source": s} for q, a, s in QA]
    hard = grounded_sft_examples(pairs, index, k=3, missing_fraction=1.0, hard_missing=1.0, seed=1)
    easy = grounded_sft_examples(pairs, index, k=3, missing_fraction=1.0, hard_missing=0.0, seed=1)
    assert all(e["missing"] and e["messages"][-1]["content"] == NOT_FOUND_REPLY for e in hard)
    same_doc = 0
    for e, (q, a, s) in zip(hard, QA):
        user = e["messages"][1]["content"]
        assert a not in user                                       # the answer is not in the context
        same_doc += f"(source: {s}" in user
    assert same_doc >= 3                                           # on topic: the answer's own document
    assert not any(f"(source: {s}" in e["messages"][1]["content"] for e, (_, _, s) in zip(easy, QA))


def test_gold_passage_survives_a_tight_budget(docs, tmp_path):
    index = PassageIndex.build([docs], tmp_path / "cache")
    pairs = [{"question": q, "answer": a, "source": s} for q, a, s in QA]
    for e in grounded_sft_examples(pairs, index, k=3, missing_fraction=0.0, max_context_tokens=90):
        cited = e["messages"][-1]["content"].rsplit("(source: ", 1)[1][:-1]
        assert f"(source: {cited})" in e["messages"][1]["content"]


SCHEDULE = """## How do I change the backup schedule?

Open Settings and choose Schedule. Pick the days and the hour of the nightly backup, then press
Save. The new schedule applies from the next run. Backups already running are not interrupted.
A schedule can also be set per machine from the agent's own settings page.

## Common problems

A backup that fails three nights in a row sends an alert to the account owner by e-mail so that
somebody can look at the agent log before more nights are lost to the same cause.
"""


def test_section_sft_examples_copy_the_answering_passage(docs, tmp_path):
    (docs / "schedule.md").write_text(SCHEDULE)
    (docs / "alerts.md").write_text(SCHEDULE.split("## Common problems")[1].join(["## Common problems", ""]))
    index = PassageIndex.build([docs], tmp_path / "cache")
    examples = section_sft_examples(index, 10, k=2, seed=3, max_reply_words=25)
    questions = [e["messages"][1]["content"].rsplit("Question: ", 1)[1] for e in examples]
    assert questions[0] == "How do I change the backup schedule?"        # question headings come first
    assert not any("Common problems" in q for q in questions)             # a name two documents share
    assert any("network setup" in q.lower() for q in questions)           # other names, templated
    for e in examples:
        system, user, reply = e["messages"]
        assert system["content"] == GROUNDED_SYSTEM_PROMPT and reply["role"] == "assistant"
        answer = strip_citation(reply["content"])
        cited = reply["content"][len(answer) + len(" (source: "):-1]
        line = next(x for x in user["content"].splitlines() if x.startswith("[") and f"(source: {cited})" in x)
        assert line.split(f"(source: {cited}) ", 1)[1].startswith(answer)  # copied from the passage's start
        assert len(answer.split()) <= 25 and answer.endswith(".")          # whole sentences within the cap
    assert examples == section_sft_examples(index, 10, k=2, seed=3, max_reply_words=25)
    assert section_sft_examples(index, 10, exclude_docs=["docs/schedule.md"], seed=3)[0]["source"] != "docs/schedule.md"
    # Hidden headings: the answer's passage is named by its document alone, and the reply cites that name.
    hidden = section_sft_examples(index, 10, k=2, seed=3, max_reply_words=25, hide_heading=1.0)
    assert [e["source"] for e in hidden] == [e["source"] for e in examples]
    for e in hidden:
        user, reply = e["messages"][1]["content"], e["messages"][2]["content"]
        cited = reply[len(strip_citation(reply)) + len(" (source: "):-1]
        assert " > " not in cited.split(" > ", 1)[1] if " > " in cited else True   # DOC > TITLE at most
        assert f"(source: {cited}) " in user


def test_grounded_reply_is_cut_where_the_context_is_cut(tmp_path):
    from chatforge.retrieval.examples import copyable_answer

    # Only what the prompt shows can be copied: whole sentences, whitespace aside.
    shown = "Open Billing. Choose the invoice and press Request refund. Refunds take five"
    assert copyable_answer("Open Billing.\nChoose the invoice and press Request refund.", shown) == \
        "Open Billing.\nChoose the invoice and press Request refund."
    assert copyable_answer("Open Billing. Choose the invoice and press Request refund. Refunds take five days.",
                           shown) == "Open Billing. Choose the invoice and press Request refund."
    assert copyable_answer("Call us. We answer at once.", shown) is None
    assert copyable_answer("Open Billing.", "") is None

    # End to end: a long FAQ answer under a small budget is cut back to what the context holds.
    long_answer = " ".join(f"Step {i} of the restore is to check the disk number {i} carefully." for i in range(40))
    faq = tmp_path / "docs" / "faq.md"
    faq.parent.mkdir()
    faq.write_text("# FAQ\n\n## How do I restore a backup?\n\n" + long_answer + "\n\n## Other?\n\nOther text here.\n")
    index = PassageIndex.build([faq.parent], tmp_path / "cache")
    pair = {"question": "How do I restore a backup?", "answer": long_answer, "source": "docs/faq.md"}
    [ex] = grounded_sft_examples([pair], index, k=2, missing_fraction=0.0, max_context_tokens=120)
    reply = strip_citation(ex["messages"][-1]["content"])
    context = " ".join(ex["messages"][-2]["content"].split())
    assert reply and reply in context and len(reply) < len(long_answer) and reply.endswith("carefully.")
    # A budget that holds it all keeps the whole answer.
    [ex] = grounded_sft_examples([pair], index, k=2, missing_fraction=0.0, max_context_tokens=4000)
    assert strip_citation(ex["messages"][-1]["content"]) == long_answer
