"""The built-in plugins (the interface is `infer/plugins.py`):

- `docs`: BM25 retrieval from the company's documents (`retrieval/`), as before plugins:
  the same passages, in retrieval's grounded prompt format. Its rule matches every message.
- `orders`: an order or ticket number in the message ("order 1042", "ticket #77", "#1042") looked
  up in the company's table, a CSV file or a SQLite table; the row becomes facts. An unknown
  number gives "no such order" facts, and a question about an order without a number gives a
  fact saying so, so the model has no status to invent.
- `calculator`: arithmetic in the message ("3 * 12", "15% of 240", "12 times 30", "4 seats at 29")
  evaluated by walking its syntax tree: numbers and + - * / ^ only, bounded sizes, never `eval`.
- `handoff`: the user asks for a person, or writes with strong negative sentiment (a word list;
  or the intent classifier routed the message here): the reply says a person will take over,
  and a ticket row goes to the feedback database (`FeedbackStore.add_ticket`).
"""

from __future__ import annotations

import ast
import csv
import json
import operator
import re
import sqlite3
from pathlib import Path

from chatforge.errors import ChatforgeError
from chatforge.infer.plugin_api import Fact, Plugin, PluginResult
from chatforge.retrieval.fusion import search_turn

BUILTINS = ("docs", "orders", "calculator", "handoff")


class DocsPlugin(Plugin):
    name = "docs"
    description = "passages of the company's documents retrieved for the question (BM25, dense or both)"
    intents = ("docs",)

    def __init__(self, index, k: int = 3):
        self.index, self.k = index, k

    def matches(self, message: str) -> bool:
        return True                   # retrieval runs on every question, as it did before plugins

    def run(self, message: str, conversation: list[dict]) -> PluginResult:
        return PluginResult(passages=search_turn(self.index, message, self.k, conversation))


# ------------------------------------------------------------------------------------------ orders

_NUMBERED = re.compile(r"\b(order|ticket|purchase|case)s?\b\W{0,3}(?:(?:number|no|num|id)\b\W{0,3})?(\d{3,10})\b"
                       r"|#\s?(\d{3,10})\b", re.IGNORECASE)
_ORDER_WORDS = re.compile(r"\b(orders?|tickets?|parcel|package|shipment|shipping|delivery|delivered|tracking|"
                          r"dispatched|shipped)\b", re.IGNORECASE)
KEY_COLUMNS = ("order_id", "order", "ticket_id", "ticket", "id", "number")


def order_numbers(message: str) -> list[str]:
    """The order or ticket numbers a message names, in order, once each."""
    found = [m.group(2) or m.group(3) for m in _NUMBERED.finditer(message)]
    return list(dict.fromkeys(found))


class OrdersPlugin(Plugin):
    """Orders from `table`: a .csv file (first row: column names), or a SQLite file as
    "FILE" (table `orders`) or "FILE:TABLE". The key column is the first of KEY_COLUMNS present,
    else the first column. The file is read at each lookup, so it can change while serving."""

    name = "orders"
    description = "looks up an order or ticket number in the company's order table"
    intents = ("orders",)

    def __init__(self, table: str | Path):
        spec = str(table)
        path, _, name = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
        self.path, self.table = Path(path), name or "orders"
        if not self.path.is_file():
            raise ChatforgeError(f"order table {self.path} does not exist (--orders FILE.csv or FILE.sqlite[:TABLE])")
        with open(self.path, "rb") as f:
            self.sqlite = f.read(16) == b"SQLite format 3\x00"
        if self.sqlite and not re.fullmatch(r"\w+", self.table):
            raise ChatforgeError(f"{self.table!r} is not a table name")
        self.source = self.path.name
        self.lookup("0")                 # fails now, with a clear message, if the table is unreadable

    def matches(self, message: str) -> bool:
        return bool(_NUMBERED.search(message) or _ORDER_WORDS.search(message))

    def _rows(self) -> tuple[list[str], list[dict]]:
        if self.sqlite:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            try:
                cur = db.execute(f'SELECT * FROM "{self.table}"')
                columns = [d[0] for d in cur.description]
                return columns, [dict(zip(columns, (str(v) for v in row))) for row in cur]
            except sqlite3.Error as e:
                raise ChatforgeError(f"cannot read table {self.table} of {self.path}: {e}") from None
            finally:
                db.close()
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                return list(reader.fieldnames or []), list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise ChatforgeError(f"cannot read the order table {self.path}: {e}") from None

    def lookup(self, number: str) -> dict | None:
        """The row whose key column holds `number`, or None."""
        columns, rows = self._rows()
        if not columns:
            raise ChatforgeError(f"the order table {self.path} has no columns")
        lowered = {c.lower().strip(): c for c in columns}
        key = next((lowered[k] for k in KEY_COLUMNS if k in lowered), columns[0])
        return next((r for r in rows if str(r.get(key, "")).strip().lstrip("#") == number), None)

    def run(self, message: str, conversation: list[dict]) -> PluginResult:
        numbers = order_numbers(message)
        if not numbers:
            return PluginResult([Fact("the message names no order or ticket number; ask the customer for it "
                                      "instead of guessing a status", self.source)])
        facts = []
        for number in numbers[:3]:
            row = self.lookup(number)
            where = f"{self.source} > {number}"
            if row is None:
                facts.append(Fact(f"no such order: {number} is not in the order table", where))
            else:
                facts.append(Fact("; ".join(f"{k}: {v}" for k, v in row.items() if k and v not in (None, "")), where))
        return PluginResult(facts)


# -------------------------------------------------------------------------------------- calculator

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_VALUE = 1e15                  # larger results are refused (and keep ** from running away)
MAX_EXPRESSION = 120              # characters


def evaluate(expression: str) -> float:
    """The value of an arithmetic expression (numbers, + - * / ** and brackets), by walking its
    syntax tree; anything else, or a value beyond MAX_VALUE, is a ValueError."""
    if len(expression) > MAX_EXPRESSION:
        raise ValueError("expression too long")
    tree = ast.parse(expression, mode="eval")

    def walk(node) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
                raise ValueError("power too large")
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            value = _OPS[type(node.op)](left, right)
            if isinstance(value, complex) or abs(value) > MAX_VALUE:
                raise ValueError("result out of range")
            return value
        raise ValueError(f"{type(node).__name__} is not arithmetic")

    return walk(tree)


_NUM = r"\d+(?:\.\d+)?"
# Words and signs people write, as operators (applied in this order, on lower-cased text).
_REWRITES = [
    (re.compile(r"[$€£]"), ""),
    (re.compile(r"(?<=\d),(?=\d{3}\b)"), ""),                                        # 1,200 -> 1200
    (re.compile(rf"({_NUM})\s*(?:%|percent)\s+off\s+(?:of\s+)?({_NUM})"), r"(\2 * (1 - \1 / 100))"),
    (re.compile(rf"({_NUM})\s*(?:%|percent)\s+of\s+({_NUM})"), r"(\1 / 100 * \2)"),
    (re.compile(rf"\bhalf of ({_NUM})"), r"(\1 / 2)"),
    (re.compile(rf"\b({_NUM})\s+(?:[a-z]+\s+){{1,2}}at\s+({_NUM})\b"), r"\1 * \2"),  # 4 seats at 29
    # "8 dollars a month for 12 months" -> 8 * 12
    (re.compile(rf"\b({_NUM})\s+(?:[a-z]+\s+){{0,2}}(?:a|per|each)\s+[a-z]+\s+for\s+({_NUM})\b"), r"\1 * \2"),
    (re.compile(r"\bmultiplied by\b|\btimes\b|×|(?<=\d)\s*x\s*(?=\d)"), " * "),
    (re.compile(r"\bdivided by\b|÷"), " / "),
    (re.compile(r"\bplus\b"), " + "),
    (re.compile(r"\bminus\b|−"), " - "),
    (re.compile(r"\bsquared\b"), " ^ 2"),
    (re.compile(r"\bcubed\b"), " ^ 3"),
]
_SPAN = re.compile(r"[\d.()+\-*/^ ]+")


def expressions(message: str) -> list[str]:
    """The arithmetic written in `message`, as expressions `evaluate` takes (** for ^)."""
    text = message.lower()
    for pattern, repl in _REWRITES:
        text = pattern.sub(repl, text)
    found = []
    for span in _SPAN.findall(text):
        expr = " ".join(span.replace("^", "**").split()).strip(" .")
        if expr.count("(") != expr.count(")"):         # a bracket of the prose around it
            expr = expr.lstrip(") ").rstrip("( ")
        # A lone number or a date-like "2024-05-02" is not a sum to work out.
        if len(re.findall(_NUM, expr)) >= 2 and re.search(r"[+*/]|\d\s+-\s+\d|\)\s*-", expr):
            found.append(expr)
    return found


def _number(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


class CalculatorPlugin(Plugin):
    name = "calculator"
    description = "works out the arithmetic in the message (prices, quantities, percentages)"
    intents = ("calculator",)

    def matches(self, message: str) -> bool:
        return bool(expressions(message))

    def run(self, message: str, conversation: list[dict]) -> PluginResult:
        facts = []
        for expr in expressions(message)[:4]:
            try:
                value = evaluate(expr)
            except (ValueError, SyntaxError, ArithmeticError) as e:
                facts.append(Fact(f"{expr.replace('**', '^')} cannot be worked out ({e})", "calculator"))
                continue
            facts.append(Fact(f"{expr.replace('**', '^')} = {_number(value)}", "calculator"))
        return PluginResult(facts)


# ----------------------------------------------------------------------------------------- handoff

_ASKS_FOR_PERSON = re.compile(
    r"\b(talk|speak|chat|connect|transfer|put|pass|get|give|need|want)\b[^.?!]{0,30}"
    r"\b(human|person|someone|somebody|representative|rep|manager|supervisor|staff|operator|people|agent)s?\b"
    r"|\b(real|live|actual)\s+(person|human|agent|people)\b|\bhuman\b|\bescalat|\bsupervisor\b|\bmanager\b"
    r"|^\W*(agent|operator|representative)\W*$|\bcustomer service\b",
    re.IGNORECASE)
_NEGATIVE = re.compile(
    r"\b(useless|ridiculous|furious|angry|terrible|awful|horrible|worst|unacceptable|hate|pathetic|disaster|"
    r"scam|disgusting|incompetent|fed up|outraged|appalling|garbage|rubbish|joke|complain|complaint)\b",
    re.IGNORECASE)


def handoff_reason(message: str) -> str | None:
    """Why `message` should go to a person ("asked for a person", "negative sentiment"), or None."""
    if _ASKS_FOR_PERSON.search(message):
        return "asked for a person"
    hits = len(_NEGATIVE.findall(message))
    if hits >= 2 or (hits and "!" in message):
        return "negative sentiment"
    return None


class HandoffPlugin(Plugin):
    """Hands the conversation to a person: a ticket row in `store` (a FeedbackStore) and a reply
    saying so. Without a store no ticket can be opened, and the reply says that instead."""

    name = "handoff"
    description = "hands the conversation to a person when asked, or when the user is upset"
    intents = ("handoff",)

    def __init__(self, store=None):
        self.store = store

    def matches(self, message: str) -> bool:
        return handoff_reason(message) is not None

    def run(self, message: str, conversation: list[dict]) -> PluginResult:
        reason = handoff_reason(message) or "routed by the intent classifier"
        if self.store is None:
            reply = ("I understand you would like a person to help. I cannot open a ticket from here; "
                     "please contact our support team directly.")
            return PluginResult([Fact(f"hand-off wanted ({reason}); no ticket store configured", "handoff")],
                                reply=reply)
        transcript = [*({"role": t["role"], "content": t["content"]} for t in conversation),
                      {"role": "user", "content": message}]
        ticket = self.store.add_ticket(getattr(conversation, "id", None), message, reason,
                                       json.dumps(transcript, ensure_ascii=False))
        reply = (f"I'm passing this conversation to a person on our support team (ticket {ticket}). "
                 "They will take over here shortly.")
        return PluginResult([Fact(f"ticket {ticket} opened ({reason})", f"tickets > {ticket}")], reply=reply)
