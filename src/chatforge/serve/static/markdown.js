// A small, safe Markdown renderer for the chat page's answers.
//
// The model's text is untrusted: it is never parsed as HTML. This file turns it into DOM nodes
// itself, with a fixed set of elements (p, br, h3-h6, ul, ol, li, pre, code, strong, em, a), text
// only through text nodes, and attributes it sets itself: a link's href only when it is an
// http(s) URL (opened with rel="noopener noreferrer"), a numbered list's start only as a number.
// What it does not know (tables, images, raw HTML) stays literal text.
//
// It renders an answer still streaming too: an unclosed ``` fence shows as code so far, an
// unclosed ** as the two stars.
"use strict";

(function () {
  const FENCE = /^ {0,3}(`{3,}|~{3,})/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const BULLET = /^\s*[-*+]\s+(.*)$/;
  const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
  // Inline spans, earliest first: `code`, **bold** / __bold__, *italic* / _italic_,
  // [label](http(s) URL), a bare http(s) URL. Underscores only count at word edges, so
  // snake_case and window.__name stay as written.
  const INLINE = new RegExp([
    "(`+)([^`]|[^`][\\s\\S]*?[^`])\\1(?!`)",                 // 1, 2: code
    "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*",                     // 3: bold
    "(?<![\\w])__(?=\\S)([\\s\\S]*?\\S)__(?![\\w])",          // 4: bold
    "\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*",                   // 5: italic
    "(?<![\\w])_(?=[^\\s_])([\\s\\S]*?[^\\s_])_(?![\\w])",    // 6: italic
    "\\[([^\\]\\n]+)\\]\\(\\s*(https?:\\/\\/[^\\s()]+)\\s*\\)", // 7, 8: link
    "(https?:\\/\\/[^\\s<>()\\[\\]]*[^\\s<>()\\[\\].,;:!?'\"])", // 9: bare URL
  ].join("|"));

  function safeHref(url) {
    try {
      const parsed = new URL(url);
      return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
    } catch (_) {
      return null;
    }
  }

  function link(label, url) {
    const href = safeHref(url);
    if (!href) return null;
    const a = document.createElement("a");
    a.href = href;
    a.rel = "noopener noreferrer";
    a.target = "_blank";
    inline(label, a, true);
    return a;
  }

  // Appends `text` to `parent` as text nodes and the few inline elements above. Inside a link
  // (`inLink`) links and URLs stay text: no link in a link, and a bare URL is its own label.
  function inline(text, parent, inLink) {
    let rest = text;
    while (rest) {
      const m = INLINE.exec(rest);
      if (!m) break;
      if (m.index > 0) parent.append(rest.slice(0, m.index));
      let node = null;
      if (m[1] !== undefined) {
        node = document.createElement("code");
        node.textContent = m[2];
      } else if (m[3] !== undefined || m[4] !== undefined) {
        node = document.createElement("strong");
        inline(m[3] !== undefined ? m[3] : m[4], node, inLink);
      } else if (m[5] !== undefined || m[6] !== undefined) {
        node = document.createElement("em");
        inline(m[5] !== undefined ? m[5] : m[6], node, inLink);
      } else if (!inLink && m[7] !== undefined) {
        node = link(m[7], m[8]);
      } else if (!inLink) {
        node = link(m[9], m[9]);
      }
      parent.append(node || m[0]);
      rest = rest.slice(m.index + m[0].length);
    }
    if (rest) parent.append(rest);
  }

  // A paragraph's lines, with the answer's own line breaks kept.
  function paragraph(lines) {
    const p = document.createElement("p");
    lines.forEach((line, i) => {
      if (i) p.append(document.createElement("br"));
      inline(line.trim(), p);
    });
    return p;
  }

  function render(text) {
    const out = document.createDocumentFragment();
    const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
    let para = [];
    let list = null;          // the open <ul> or <ol>
    let item = null;          // its last <li>, which indented lines continue

    const flush = () => {
      if (para.length) out.append(paragraph(para));
      para = [];
    };
    const closeList = () => {
      list = null;
      item = null;
    };

    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = FENCE.exec(line);
      if (fence) {
        flush();
        closeList();
        const code = [];
        for (i += 1; i < lines.length && !lines[i].trimStart().startsWith(fence[1]); i++) code.push(lines[i]);
        while (code.length && !code[code.length - 1].trim()) code.pop();
        const pre = document.createElement("pre");
        const c = document.createElement("code");
        c.textContent = code.join("\n");
        pre.append(c);
        out.append(pre);
        continue;
      }
      if (!line.trim()) {
        flush();
        // A blank line inside a list keeps it open only if the next item follows.
        const next = lines[i + 1] || "";
        if (list && !(list.tagName === "UL" ? BULLET : NUMBERED).test(next)) closeList();
        continue;
      }
      const heading = HEADING.exec(line);
      if (heading) {
        flush();
        closeList();
        // The page's own headings are h1-h3: an answer's start at h3 and stay below them.
        const h = document.createElement("h" + Math.min(6, heading[1].length + 2));
        inline(heading[2], h);
        out.append(h);
        continue;
      }
      const bullet = BULLET.exec(line);
      const numbered = bullet ? null : NUMBERED.exec(line);
      if (bullet || numbered) {
        flush();
        const tag = bullet ? "UL" : "OL";
        if (!list || list.tagName !== tag) {
          list = document.createElement(tag);
          if (numbered && Number(numbered[1]) !== 1) list.start = Number(numbered[1]);
          out.append(list);
        }
        item = document.createElement("li");
        inline((bullet ? bullet[1] : numbered[2]).trim(), item);
        list.append(item);
        continue;
      }
      if (item && /^\s+\S/.test(line)) {
        // An indented line continues the list item above it.
        item.append(document.createElement("br"));
        inline(line.trim(), item);
        continue;
      }
      closeList();
      para.push(line);
    }
    flush();
    return out;
  }

  window.chatforgeMarkdown = { render };
})();
