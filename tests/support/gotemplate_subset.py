"""A tiny evaluator for the subset of Go's text/template that convert/gguf/modelfile.py's TEMPLATE
uses, so its rendering is checked where no Go toolchain is installed (test_modelfile.py also
runs real Go when `go` is on PATH).

Supported: text; {{- / -}} whitespace trimming; `range PIPE` (no else), `if` / `else if` /
`else` / `end`; `$x := PIPE`, `$x = PIPE` (assignment reaches the declaring scope, as in Go
1.11+); printing a pipeline; commands `eq`, `and` (short-circuit, Go 1.18+), `ge`, `len`,
`slice`; arguments: "string" literals, integers, .Field (on the dot), $var, (sub-pipelines).
Anything else raises, so a template that drifts out of the subset fails its test.
"""
from __future__ import annotations

import json
import re

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_ARG = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|[^\s()]+)')


def _lex(src: str) -> list:
    """[("text", s) | ("action", body)] with Go's trim markers applied to the texts."""
    items, pos = [], 0
    for m in _ACTION.finditer(src):
        items.append(["text", src[pos:m.start()]])
        if m.group(1):
            items[-1][1] = items[-1][1].rstrip(" \t\r\n")
        items.append(["action", m.group(2), bool(m.group(3))])
        pos = m.end()
    items.append(["text", src[pos:]])
    for i, item in enumerate(items):
        if item[0] == "action" and item[2]:
            items[i + 1][1] = items[i + 1][1].lstrip(" \t\r\n")
    return items


def _parse(items: list, i: int = 0, stop=("end",)):
    """-> (node list, index after, the word that ended it)"""
    nodes = []
    while i < len(items):
        kind, body = items[i][0], items[i][1]
        i += 1
        if kind == "text":
            nodes.append(("text", body))
            continue
        word = body.split(" ", 1)[0]
        if word in stop:
            return nodes, i - 1, body
        if word == "range":
            inner, i, _ = _parse(items, i)
            nodes.append(("range", body[6:], inner))
            i += 1
        elif word == "if":
            branches, cond = [], body[3:]
            while True:
                inner, i, ended = _parse(items, i, ("end", "else"))
                branches.append((cond, inner))
                i += 1
                if ended == "end":
                    break
                cond = ended[8:] if ended.startswith("else if ") else "true"
            nodes.append(("if", branches))
        else:
            nodes.append(("action", body))
    return nodes, i, None


def _tokens(pipe: str) -> list:
    return [t for t in _ARG.findall(pipe) if t]


def _value(tokens: list, scopes: list, dot):
    tok = tokens.pop(0)
    if tok == "(":
        args = []
        while tokens[0] != ")":
            args.append(tokens.pop(0) if tokens[0] != "(" else _group(tokens))
        tokens.pop(0)
        return _call(args, scopes, dot)
    return _atom(tok, scopes, dot)


def _group(tokens: list) -> list:
    depth, out = 0, []
    while True:
        tok = tokens.pop(0)
        out.append(tok)
        depth += tok == "("
        depth -= tok == ")"
        if depth == 0:
            return out


def _atom(tok, scopes, dot):
    if isinstance(tok, list):
        return _value(list(tok), scopes, dot)
    if tok.startswith('"'):
        return json.loads(tok)
    if tok.lstrip("-").isdigit():
        return int(tok)
    if tok == "true":
        return True
    if tok.startswith("$"):
        for scope in reversed(scopes):
            if tok in scope:
                return scope[tok]
        raise NameError(tok)
    if tok.startswith("."):
        return dot[tok[1:]] if isinstance(dot, dict) else getattr(dot, tok[1:])
    raise ValueError(f"not in the subset: {tok}")


def _call(args: list, scopes, dot):
    if len(args) == 1:
        return _atom(args[0], scopes, dot)
    name, rest = args[0], args[1:]
    if name == "and":   # short-circuit: stop at the first false argument
        value = True
        for arg in rest:
            value = _atom(arg, scopes, dot)
            if not value:
                return value
        return value
    vals = [_atom(a, scopes, dot) for a in rest]
    table = {"eq": lambda a, b: a == b, "ge": lambda a, b: a >= b, "len": len,
             "slice": lambda s, i, j=None: s[i:j] if 0 <= i <= (len(s) if j is None else j) <= len(s) else _oob()}
    return table[name](*vals)


def _oob():
    raise IndexError("slice out of range (Go's template errors here)")


def _pipe(text: str, scopes, dot):
    tokens, args = _tokens(text), []
    while tokens:
        args.append(tokens.pop(0) if tokens[0] != "(" else _group(tokens))
    return _call(args, scopes, dot)


def _run(nodes, scopes, dot, out):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "range":
            for item in _pipe(node[1], scopes, dot) or []:
                scopes.append({})
                _run(node[2], scopes, item, out)
                scopes.pop()
        elif node[0] == "if":
            for cond, inner in node[1]:
                if _pipe(cond, scopes, dot):
                    scopes.append({})
                    _run(inner, scopes, dot, out)
                    scopes.pop()
                    break
        elif m := re.match(r"(\$\w+)\s*(:?=)\s*(.*)", node[1], re.S):
            value = _pipe(m.group(3), scopes, dot)
            if m.group(2) == ":=":
                scopes[-1][m.group(1)] = value
            else:
                next(s for s in reversed(scopes) if m.group(1) in s)[m.group(1)] = value
        else:
            out.append(str(_pipe(node[1], scopes, dot)))


def render(template: str, data: dict) -> str:
    nodes, _, _ = _parse(_lex(template))
    out: list = []
    _run(nodes, [{"$": data}], data, out)
    return "".join(out)
