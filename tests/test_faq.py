"""extract_pairs on small FAQ texts modelled on the real files the fetched packages ship."""

from __future__ import annotations

import time
from pathlib import Path

from chatforge.data.faq import extract_pairs

NBSP = "\xa0"

# The Debian FAQ as debian-faq ships it (debian-faq.en.txt): a table of contents that repeats the
# headings at column 0, chapters marked "Chapter N." (with non-breaking spaces), indented bodies,
# titles that wrap, and sub-sections that are not questions.
DEBIAN = f"""
                      The Debian GNU/Linux FAQ

Table of Contents

1. Definitions and overview
    1.1. What is this FAQ?
8. The Debian package management tools
    8.1. What programs does Debian provide for managing its packages?

---------------------------------------------------------------------

Chapter{NBSP}1.{NBSP}Definitions and overview

Please read this chapter first.

1.1. What is this FAQ?

    This document gives frequently asked questions (with their
    answers!) about the Debian distribution.

1.2. What is the difference between Debian GNU/Linux and other Linux
distributions? Why should I choose Debian?

    These key features distinguish Debian:

      * Freedom

{NBSP}{NBSP}{NBSP} make deb-pkg

Chapter{NBSP}8.{NBSP}The Debian package management tools

8.1. What programs does Debian provide for managing its packages?

    There are multiple tools.

8.1.1. dpkg

    This is the main package management program.

8.2. How do I display the files of an installed package?

    Use dpkg -L package.

16.2. Feedback

    Comments and additions to this document are always welcome.
"""


def test_debian_faq():
    pairs = extract_pairs(Path("debian-faq.en.txt"), DEBIAN)
    assert pairs == [
        ("What is this FAQ?",
         "This document gives frequently asked questions (with their\n"
         "answers!) about the Debian distribution."),
        ("What is the difference between Debian GNU/Linux and other Linux distributions? "
         "Why should I choose Debian?",
         "These key features distinguish Debian:\n\n  * Freedom\n\nmake deb-pkg"),
        ("What programs does Debian provide for managing its packages?",
         "There are multiple tools.\n\ndpkg\n\nThis is the main package management program."),
        ("How do I display the files of an installed package?", "Use dpkg -L package."),
    ]


def test_debian_faq_gz_name_and_content_detection():
    assert extract_pairs(Path("debian-faq.en.txt.gz"), DEBIAN)
    assert extract_pairs(Path("faq.txt"), DEBIAN)          # recognised by its title
    assert extract_pairs(Path("notes.txt"), "1.1. What is this?\n\n    Not the Debian FAQ.\n") is None


# The Python FAQ (faq/*.rst.txt): overlined document title, `===` sections, `---` questions.
PYTHON = """:tocdepth: 2

===============
Programming FAQ
===============

.. only:: html

   .. contents::

General Questions
=================

.. _faq-debugger:

Is there a source code level debugger?
--------------------------------------

Yes.  The built-in function
:func:`breakpoint` drops into :mod:`the debugger <pdb>`; see
`the pdb docs <https://docs.python.org/3/library/pdb.html>`_ and ``python -m
pdb``.  **Really**.

How do I make an array?
-----------------------

Use a list::

   ["this", 1, "is", "an", "array"]

.. code-block:: python

   x = [1, 2]

.. note::
   Lists hold *any* object.

I try to use __spam and I get an error about _SomeClassName__spam.
------------------------------------------------------------------

Names with two leading underscores are mangled; see :meth:`~object.__init__`.

Empty question?
---------------

Performance
===========

Some prose that is not an answer.
"""


def test_python_faq_rst():
    pairs = extract_pairs(Path("faq/programming.rst.txt"), PYTHON)
    assert pairs == [
        ("Is there a source code level debugger?",
         "Yes.  The built-in function\nbreakpoint drops into the debugger; see\n"
         "the pdb docs and python -m\npdb.  Really."),
        ("How do I make an array?",
         'Use a list:\n\n   ["this", 1, "is", "an", "array"]\n\n    x = [1, 2]\n\n'
         "Note:\nLists hold any object."),
        ("I try to use __spam and I get an error about _SomeClassName__spam.",
         "Names with two leading underscores are mangled; see __init__."),
    ]


def test_rst_outside_a_faq_is_not_a_faq():
    doc = "Tutorial\n========\n\nWhat is Python?\n---------------\n\nA language.\n"
    assert extract_pairs(Path("tutorial/intro.rst.txt"), doc) is None
    assert extract_pairs(Path("faq/general.rst.txt"), doc) == [("What is Python?", "A language.")]


# perlfaq pod: =head2 questions, X<> index entries, nested and doubled formatting codes.
PERL = """=head1 NAME

perlfaq4 - Data Manipulation

=head1 Data: Numbers

=head2 Why is int() broken?
X<int> X<rounding>

Your C<int()> is most probably working just fine. See
L<perlop/"Floating-point Arithmetic"> and L<the POSIX module|POSIX>.
Use C<< $x->{y} >> and E<lt>STDINE<gt>.


    printf("%.2f", 19.95);

=over 4

=item *

B<Never> do I<this>.

=back

=head2 Empty one?

=head2 How do I find yesterday's date?

Use L<Time::Piece>.

=head1 AUTHOR AND COPYRIGHT

Copyright (c) 1997-2010 Tom Christiansen.

=cut
"""


def test_perlfaq_pod():
    pairs = extract_pairs(Path("perlfaq4.pod"), PERL)
    assert pairs == [
        ("Why is int() broken?",
         "Your int() is most probably working just fine. See\n"
         "Floating-point Arithmetic in perlop and the POSIX module.\n"
         "Use $x->{y} and <STDIN>.\n\n"
         '    printf("%.2f", 19.95);\n\n'
         "* Never do this."),
        ("How do I find yesterday's date?", "Use Time::Piece."),
    ]


def test_other_pod_is_not_a_faq():
    assert extract_pairs(Path("perlintro.pod"), "=head1 NAME\n\nperlintro - intro\n\n=head2 What?\n\nYes.\n") is None


# gitfaq.txt (asciidoc) as git-doc ships it.
GIT = """gitfaq(7)
=========

NAME
----
gitfaq - Frequently asked questions about using Git

Configuration
-------------

[[user-name]]
What should I put in `user.name`?::
\tYou should put your personal name, generally a form using a given name
\tand family name.
+
This has no effect on authentication; see linkgit:git-config[1].

[[configure-editor]]
How do I configure a different editor?::
\tSet `VISUAL`, for example:
+
----
export VISUAL=nano
\tgit config core.editor
----
+
Or see <<user-name,the user name entry>>.

Common Issues
-------------

[[ignore]]
I asked Git to ignore various files, yet they are still tracked::
\tUse `git rm --cached <file>`.

GIT
---
Part of the linkgit:git[1] suite
"""


def test_gitfaq_asciidoc():
    pairs = extract_pairs(Path("gitfaq.txt"), GIT)
    assert pairs == [
        ("What should I put in user.name?",
         "You should put your personal name, generally a form using a given name\nand family name.\n\n"
         "This has no effect on authentication; see git-config(1)."),
        ("How do I configure a different editor?",
         "Set VISUAL, for example:\n\n    export VISUAL=nano\n        git config core.editor\n\n"
         "Or see the user name entry."),
        ("I asked Git to ignore various files, yet they are still tracked", "Use git rm --cached <file>."),
    ]
    assert extract_pairs(Path("gitfaq.adoc"), GIT) == pairs


GIT_HTML = """<html><head><style>dt { color: red }</style></head><body>
<div class="sect1"><h2 id="_configuration">Configuration</h2>
<div class="dlist" id="user-name"><dl>
<dt class="hdlist1">
What should I put in <code>user.name</code>?
</dt>
<dd>
<p>
        You should put your personal name, generally a form using a given name
        and family name.
</p>
<div class="paragraph"><p>See <a href="git-config.html">git-config(1)</a>.</p></div>
</dd>
<dt class="hdlist1">
How do I configure a different editor?
</dt>
<dd>
<div class="listingblock"><div class="content"><pre><code>export VISUAL=nano</code></pre></div></div>
</dd>
</dl></div></div></body></html>
"""


def test_gitfaq_html():
    assert extract_pairs(Path("gitfaq.html"), GIT_HTML) == [
        ("What should I put in user.name?",
         "You should put your personal name, generally a form using a given name and family name.\n\n"
         "See git-config(1)."),
        ("How do I configure a different editor?", "export VISUAL=nano"),
    ]


def test_non_faq_files_return_none_quickly():
    big = "This is an ordinary manual page. How do I read it?\n" * 20000      # ~1 MB
    t0 = time.perf_counter()
    for name in ("README.md", "manual.txt", "guide.html", "notes", "data.jsonl", "perlop.pod", "intro.rst"):
        assert extract_pairs(Path(name), big) is None
    assert time.perf_counter() - t0 < 0.5


def test_a_faq_without_answers_is_none():
    assert extract_pairs(Path("perlfaq1.pod"), "=head1 NAME\n\nperlfaq1 - x\n\n=head2 Why?\n\n=head2 How?\n") is None


def test_markdown_faq_headings_become_pairs():
    text = ("# Acme FAQ\n\nIntro text.\n\n## How do I reset my **password**?\n\nOpen [Settings](https://x.example)"
            " and press `Reset`.\n\n```\nacme reset --me\n```\n\n## Pricing\n\nNot a question.\n\n"
            "### Can I pay yearly?\n\nYes, with a 10% discount.\n")
    pairs = extract_pairs(Path("faq.md"), text)
    assert pairs == [
        ("How do I reset my password?", "Open Settings and press Reset.\n\n    acme reset --me"),
        ("Can I pay yearly?", "Yes, with a 10% discount."),
    ]


def test_markdown_without_question_headings_is_not_a_faq():
    assert extract_pairs(Path("guide.md"), "# Guide\n\n## Install\n\nRun it.\n\n## Is it fast?\n\nYes.\n") is None
