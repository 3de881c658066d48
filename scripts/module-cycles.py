#!/usr/bin/env python3
"""Import circles between the engine crate's modules.

Reads every `crate::a::b` path in engine/src (use declarations and inline paths, comments and
doc comments left out), maps each to the file that defines it, and prints every strongly
connected component of more than one file (Tarjan's algorithm): each is an import circle.
Exit status 1 when there is one. Usage: python3 scripts/module-cycles.py [engine/src]
"""
import os
import re
import sys

root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "engine", "src")
root = os.path.normpath(root)

# Module path (tuple) -> file, for every library file (main.rs is the binary: left out).
modules = {}
for dirpath, _, files in os.walk(root):
    for f in files:
        if not f.endswith(".rs"):
            continue
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, root)[:-3].split(os.sep)
        if rel == ["main"]:
            continue
        if rel[-1] in ("mod", "lib"):
            rel = rel[:-1]
        modules[tuple(rel)] = path


def owner(parts):
    """The longest module prefix of a path."""
    for n in range(len(parts), -1, -1):
        if tuple(parts[:n]) in modules:
            return tuple(parts[:n])
    return None


def code(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line.split("//")[0] for line in text.splitlines())


def expand(body):
    """`a::{b, c::{d}}` -> [a::b, a::c::d]."""
    body = body.strip()
    m = re.match(r"^(.*?)\{(.*)\}$", body, flags=re.S)
    if not m:
        return [body]
    prefix, inner = m.group(1), m.group(2)
    items, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    out = []
    for item in items:
        if item.strip():
            out += [prefix + e for e in expand(item)]
    return out


edges = {m: set() for m in modules}
for mod, path in modules.items():
    text = code(open(path, encoding="utf-8").read())
    paths = []
    for use in re.findall(r"\buse\s+(crate::[^;]+);", text, flags=re.S):
        paths += expand(use)
    paths += re.findall(r"\bcrate((?:::[A-Za-z_][A-Za-z0-9_]*)+)", text)
    for p in paths:
        parts = [x for x in re.sub(r"\s", "", p).split("::") if x and x != "crate"]
        parts = [x.split(" as ")[0] for x in parts]
        target = owner(parts)
        if target is not None and target != mod and target != ():
            # A child module's own parent (ingest/x.rs -> ingest/mod.rs) counts as an edge too.
            edges[mod].add(target)

index, low, stack, on, sccs = {}, {}, [], set(), []
counter = [0]
sys.setrecursionlimit(10000)


def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges[v]:
        if w not in index:
            visit(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            sccs.append(comp)


for v in sorted(modules):
    if v not in index:
        visit(v)

name = lambda m: "::".join(m) or "lib"
for comp in sccs:
    members = sorted(comp)
    print(f"import circle of {len(members)} files:")
    for m in members:
        inside = sorted(name(t) for t in edges[m] if t in comp)
        print(f"  {name(m)} -> {', '.join(inside)}")
if not sccs:
    print(f"no import circle among {len(modules)} files")
sys.exit(1 if sccs else 0)
