"""`chatforge.data.clean`: normalisation, markup stripping, PII scrubbing (both ways), filters."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatforge.data.clean import (FilterConfig, alpha_ratio, check_quality, dup_line_ratio, normalize,
                                  scrub_pii, strip_html, strip_markdown, strip_pod, strip_rst)

# --------------------------------------------------------------------------- normalisation


def test_normalize_unicode_and_mojibake():
    assert normalize("cafe\u0301") == "caf\u00e9"                 # NFC
    assert normalize("It doesn\u00e2\u20ac\u2122t work") == "It doesn't work"   # mojibake repaired
    assert normalize("a\u00a0b\u200bc") == "a bc"                  # odd spaces, zero-width space
    assert normalize("\ufeffBOM") == "BOM"


def test_normalize_whitespace_keeps_paragraphs_and_code():
    text = "Title\r\n\r\n\r\n\r\nSome   words\there.  \n\n    def f(x):\n        return  x\n\x0c\nEnd\n"
    out = normalize(text)
    assert out == "Title\n\nSome words here.\n\n    def f(x):\n        return  x\n\nEnd"


def test_normalize_dedents_a_fully_indented_document():
    assert normalize("   one\n   two\n\n     three") == "one\ntwo\n\n  three"


# --------------------------------------------------------------------------- markup


def test_strip_html():
    html = """<html><head><title>Page</title><script>alert(1)</script><style>.x{}</style></head>
    <body><h1>Head</h1><p>One &amp; <b>two</b>
    lines</p><ul><li>first</li><li>second</li></ul>
    <pre>def f():
    return 1</pre><table><tr><td>a</td><td>b</td></tr></table></body></html>"""
    out = strip_html(html)
    assert out.startswith("Page\n\nHead\n\nOne & two lines")
    assert "- first\n- second" in out
    assert "    def f():\n        return 1" in out               # code keeps its indentation
    assert "alert" not in out and ".x{}" not in out
    assert "a | b" in out


def test_strip_markdown():
    md = ("Setext title\n============\n\n## Install *now* ##\n\n> quoted **text**\n\n"
          "Use [the docs](https://x.org/a_(b)) and ![logo](l.png) and `my_var_name` or __init__.\n\n"
          "```python\nx = 1\n```\n\n---\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n[ref]: https://example.org\n")
    out = strip_markdown(md)
    assert "Setext title" in out and "=====" not in out
    assert "Install now" in out and "##" not in out
    assert "quoted text" in out and ">" not in out
    assert "Use the docs and logo and my_var_name or __init__." in out
    assert "    x = 1" in out and "```" not in out
    assert "https://example.org" not in out and "---" not in out


def test_strip_rst():
    rst = (".. _label:\n\nTitle\n=====\n\n.. index:: foo\n   single: bar\n\n"
           "See :ref:`the intro <intro>` and :func:`~os.path.join`, ``literal``, `Python <https://python.org>`_.\n\n"
           ".. note::\n   Noted text.\n\nExample::\n\n    for i in range(3):\n        print(i)\n\n"
           ".. code-block:: python\n   :linenos:\n\n   x = 1\n\n.. comment line\n   more comment\n\nAfter.\n")
    out = strip_rst(rst)
    assert "Title" in out and "=====" not in out and "index" not in out and "single: bar" not in out
    assert "See the intro and join, literal, Python." in out
    assert "Noted text." in out.splitlines()
    assert "Example:" in out and "    for i in range(3):\n        print(i)" in out
    assert "   x = 1" in out and "linenos" not in out
    assert "comment" not in out and out.rstrip().endswith("After.")


def test_strip_pod():
    pod = ("=head1 NAME\n\nperlfaq4 - Data\n\n=head2 How do I round?\n\n"
           "Use C<sprintf> or L<the manual|perlfunc/sprintf>; see L<perlop> and E<lt>E<gt>, C<< $a->[0] >>.\n\n"
           "Escapes: E<eacute> E<233> E<0xE9> E<0351> E<075> E<nonsense>.\n\n"
           "    printf(\"%.2f\", $x);  # C<not a code>\n\n=over 4\n\n=item *\n\nOne B<bold>\n\n=back\n\n"
           "=begin html\n\n<p>html only</p>\n\n=end html\n\n=cut\n\nsub code { 1 }\n")
    out = strip_pod(pod)
    assert "How do I round?" in out and "=head" not in out
    assert "Use sprintf or the manual; see perlop and <>, $a->[0]." in out
    assert '    printf("%.2f", $x);  # C<not a code>' in out   # verbatim paragraphs stay verbatim
    assert "Escapes: \u00e9 \u00e9 \u00e9 \u00e9 = ." in out
    assert "- One bold" in out
    assert "html only" not in out and "sub code" not in out


# --------------------------------------------------------------------------- PII: what is replaced

PII_POSITIVE = [
    ("EMAIL", "write to jane.doe@example.com today", "write to <EMAIL> today"),
    ("EMAIL", "Mail: j+tag@mail.example.co.uk.", "Mail: <EMAIL>."),
    ("EMAIL", "<maria_lopez-99@sub.domain.org>", "<<EMAIL>>"),
    ("EMAIL", "CONTACT: ADMIN@EXAMPLE.ORG", "CONTACT: <EMAIL>"),
    ("PHONE", "call (555) 123-4567 now", "call <PHONE> now"),
    ("PHONE", "London: 020 7946 0958", "London: <PHONE>"),
    ("PHONE", "tel +44 20 7946 0958.", "tel <PHONE>."),
    ("PHONE", "US: +1-202-555-0173", "US: <PHONE>"),
    ("PHONE", "+15551234567", "<PHONE>"),
    ("PHONE", "ring 555-123-4567 or 555.123.4567", "ring <PHONE> or <PHONE>"),
    ("PHONE", "toll free 1-800-555-0199", "toll free <PHONE>"),
    ("PHONE", "Paris 06 12 34 56 78", "Paris <PHONE>"),
    ("PHONE", "Berlin +49 (0)30 1234567", "Berlin <PHONE>"),
    ("PHONE", "tel:+33142685300", "tel:<PHONE>"),
    ("PHONE", "office 0171 123 4567", "office <PHONE>"),
    ("CARD", "card 4111 1111 1111 1111 ok", "card <CARD> ok"),
    ("CARD", "4111-1111-1111-1111", "<CARD>"),
    ("CARD", "pan=5500000000000004;", "pan=<CARD>;"),
    ("CARD", "amex 3782 822463 10005", "amex <CARD>"),
    ("CARD", "6011 1111 1111 1117.", "<CARD>."),
    ("IP", "server 192.168.1.10 is down", "server <IP> is down"),
    ("IP", "proxy 10.20.30.40:3128", "proxy <IP>:3128"),
    ("IP", "dns 8.8.8.8.", "dns <IP>."),
    ("IP", "net 172.16.0.0/12", "net <IP>/12"),
    ("IP", "host 2001:db8::8a2e:370:7334 up", "host <IP> up"),
    ("IP", "full 2001:0db8:85a3:0000:0000:8a2e:0370:7334", "full <IP>"),
    ("IP", "link-local fe80::1%eth0", "link-local <IP>"),
    ("IP", "loopback ::1 only", "loopback <IP> only"),
    ("IP", "http://[2001:db8::1]:8080/", "http://[<IP>]:8080/"),
    ("IBAN", "IBAN DE89 3704 0044 0532 0130 00", "IBAN <IBAN>"),
    ("IBAN", "GB82WEST12345698765432", "<IBAN>"),
    ("IBAN", "to GB82 WEST 1234 5698 7654 32 THEN", "to <IBAN> THEN"),
    ("IBAN", "FR14 2004 1010 0505 0001 3M02 606", "<IBAN>"),
    ("SECRET_URL", "clone https://bob:hunter2@git.example.com/repo.git", "clone <SECRET_URL>"),
    ("SECRET_URL", "GET https://api.example.com/v1/items?api_key=abc123&page=2", "GET <SECRET_URL>"),
    ("SECRET_URL", "see (https://x.example/cb?access_token=zz).", "see (<SECRET_URL>)."),
    ("SECRET_URL", "https://s3.example.com/f?X-Amz-Signature=abcd", "<SECRET_URL>"),
    ("SECRET_URL", "postgres://admin:pw@db.internal:5432/app", "<SECRET_URL>"),
    ("SECRET_URL", "https://x.example/?token=t0k3n", "<SECRET_URL>"),
    ("SECRET_URL", "https://x.example/dl?sig=abc&exp=1", "<SECRET_URL>"),
    ("SECRET_URL", "ftp://u.example/f?password=secret", "<SECRET_URL>"),
    ("SECRET_URL", "https://x.example/?client_secret=s", "<SECRET_URL>"),
]


@pytest.mark.parametrize("kind, text, expected", PII_POSITIVE, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(PII_POSITIVE)])
def test_scrub_pii_replaces(kind, text, expected):
    out, counts = scrub_pii(text)
    assert out == expected
    assert counts[kind] == expected.count(f"<{kind}>") and sum(counts.values()) == counts[kind]


# --------------------------------------------------------------------------- PII: what survives

PII_NEGATIVE = [
    "Python 3.11.7 was released", "upgrade to version 1.2.3.4 now", "v1.2.3.4", "Version: 10.0.0.1",
    "release 4.3.2.1 notes", "1.2.3.4.5 is an OID", "999.1.1.1", "255.255.255.256",
    "on 2024-01-15 at 10:30:45", "15/01/2024", "15.01.2024", "2024-01-15T10:30:00Z", "12:30",
    "costs $1,299.99", "1,234,567 users", "3.14159265358979", "EUR 1.234.567,89",
    "ISBN 978-0-596-52068-7", "ISBN 0-596-52068-9", "ISBN 9780596520687",
    "commit 2fd4e1c67a2d28fced849ee1bb76e7391b93eb12", "deadbeefcafebabe1234567890abcdef",
    "uuid 123e4567-e89b-12d3-a456-426614174000", "a = 12345678", "x = 1234567890123",
    "line 1234 of 5678", "localhost:8080", "port 5432", "timestamp 1705312345",
    "x[::2]", "a[1::3]", "arr[:, ::2]", "Foo::Bar->new", "Example::", "std::vector<int>", "dead::beef",
    "00:1a:2b:3c:4d:5e", "2021 2022 2023 2024", "4111 1111 1111 1112", "1234 5678 9012 3456",
    "DE89 3704 0044 0532 0130 01", "https://example.com/search?q=python&page=2",
    "https://example.com/a?monkey=1", "ssh://git@host/repo", "@property", "user@localhost",
    "chmod 0755 file", "RFC 2616", "Debian 12.5", "0x7fff5fbff8c8", "+1 ms", "call 12345",
    "123-45-6789", "1234 5678", "0000 0010 0020 0030", "phone: none", "10.0.0",
    "perl -e 'print 1+2'", "E.164 numbers", "Successfully installed novas-3.1.1.3",
    "# combinations(range(4), 3) --> 012 013 023 123", "in the form '+000000120'.", "ratio 16:9", "Apr 15 10:30:45 host kernel: [12345.678901]",
]


@pytest.mark.parametrize("text", PII_NEGATIVE)
def test_scrub_pii_keeps(text):
    out, counts = scrub_pii(text)
    assert out == text and not counts


def test_scrub_pii_counts_and_mixed_text():
    text = ("Reach jane@example.com or bob@example.org, phone (555) 123-4567, card 4111 1111 1111 1111, "
            "host 10.0.0.1 (Python 3.11.7, released 2023-12-04, costs $0).")
    out, counts = scrub_pii(text)
    assert out == ("Reach <EMAIL> or <EMAIL>, phone <PHONE>, card <CARD>, host <IP> "
                   "(Python 3.11.7, released 2023-12-04, costs $0).")
    assert counts == {"EMAIL": 2, "PHONE": 1, "CARD": 1, "IP": 1}
    assert scrub_pii(out) == (out, {})        # placeholders are stable


def _luhn_complete(prefix: str) -> str:
    for last in "0123456789":
        digits = prefix + last
        total = 0
        for i, ch in enumerate(reversed(digits)):
            d = int(ch)
            if i % 2:
                d = d * 2 - 9 if d > 4 else d * 2
            total += d
        if total % 10 == 0:
            return digits
    raise AssertionError


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=10**14, max_value=10**15 - 1), st.sampled_from(["4", "5", "6"]), st.sampled_from(["", " ", "-"]))
def test_any_valid_card_is_scrubbed(body, first, sep):
    number = _luhn_complete(first + str(body)[:14])
    formatted = sep.join(number[i:i + 4] for i in range(0, 16, 4))
    assert scrub_pii(f"paid with {formatted}.") == ("paid with <CARD>.", {"CARD": 1})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=4, max_size=4))
def test_any_ipv4_is_scrubbed(octets):
    ip = ".".join(map(str, octets))
    assert scrub_pii(f"from {ip} today")[0] == "from <IP> today"
    assert scrub_pii(f"version {ip}")[0] == f"version {ip}"


@settings(max_examples=200, deadline=None)
@given(st.dates(), st.times())
def test_dates_and_times_survive(date, time):
    for text in (f"{date.isoformat()} {time.isoformat(timespec='seconds')}", date.strftime("%d/%m/%Y"),
                 date.strftime("%d.%m.%Y"), date.strftime("%Y%m%d")):
        assert scrub_pii(text) == (text, {})


def test_scrub_pii_is_fast_enough_to_run_on_a_corpus():
    # Not a timing assertion: just a large mixed text through every code path once.
    rng = random.Random(0)
    words = ["the", "agent", "backup", "3.11.7", "2024-01-15", "x[::2]", "$1,299.99", "a@b.co", "10.0.0.1"]
    text = " ".join(rng.choice(words) for _ in range(50_000))
    out, counts = scrub_pii(text)
    assert counts["EMAIL"] == text.count("a@b.co") and counts["IP"] == text.count("10.0.0.1")


# --------------------------------------------------------------------------- quality filters

PYTHON_DOC = '''The json module encodes and decodes JSON.

    >>> import json
    >>> json.dumps(['foo', {'bar': ('baz', None, 1.0, 2)}])
    '["foo", {"bar": ["baz", null, 1.0, 2]}]'
    >>> print(json.dumps({"4": 5, "6": 7}, sort_keys=True, indent=4))
    {
        "4": 5,
        "6": 7
    }

Decoding JSON returns Python objects; see the conversion table below for details.'''

PERL_DOC = r'''How do I strip blank space from the beginning/end of a string?

A substitution can do this for you. For a single line, you want to replace all the leading
or trailing whitespace with nothing. You can do that with a pair of substitutions:

    s/^\s+//;
    s/\s+$//;

You can also write that as a single substitution, although it turns out the combined
statement is slower than the separate ones:

    s/^\s+|\s+$//g;'''


def test_code_heavy_documentation_survives():
    assert check_quality(PYTHON_DOC) is None
    assert check_quality(PERL_DOC) is None


def test_each_filter_rejects_its_case():
    cfg = FilterConfig(min_chars=50, max_chars=2000)
    assert check_quality("too short", cfg) == "too_short"
    assert check_quality("word " * 1000, cfg) == "too_long"
    hexdump = "\n".join(f"{i:08x}  3f 2a 00 ff 10 20 30 40  |?*.. 0@|" for i in range(20))
    assert check_quality(hexdump, cfg) == "non_text"
    assert check_quality("1,2,3,4,5\n" * 20 + "6,7,8,9,10", cfg) == "non_text"
    spam = "Buy cheap watches now, best prices!\n" * 10 + "Contact us today for a quote."
    assert check_quality(spam, cfg) == "repeated_lines"
    prose = "A normal paragraph of support text that explains how to restore a file from backup."
    assert check_quality(prose, cfg) is None


def test_ratios():
    assert alpha_ratio("abc 123") == pytest.approx(0.5)
    assert alpha_ratio("caf\u00e9 \u00e9t\u00e9 99") == pytest.approx(7 / 9)
    assert alpha_ratio("") == 1.0
    assert dup_line_ratio("a\nb\na\n\nb") == pytest.approx(0.5)
    assert dup_line_ratio("one\ntwo") == 0.0
