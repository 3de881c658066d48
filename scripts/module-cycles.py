#!/usr/bin/env python3
"""Import circles between the engine crate's modules.

Reads every `crate::a::b` and `super::a` path in engine/src (use declarations and inline paths,
comments and doc comments left out), maps each to the module that defines it, and prints every
strongly connected component of more than one module (Tarjan's algorithm): each is an import
circle. A private child module (`mod x;`, not `pub mod`) is a part of its parent, not a room of
its own: it may use its parent's private items. Exit status 1 when there is a circle.
Usage: python3 scripts/module-cycles.py [engine/src]
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


def private_children():
    """Modules declared `mod x;` (not pub) by their parent."""
    out = set()
    for mod, path in modules.items():
        for name in re.findall(r"^\s*mod\s+([a-z_0-9]+)\s*;", open(path, encoding="utf-8").read(), flags=re.M):
            if name != "tests":
                out.add(mod + (name,))
    return out


PRIVATE = private_children()


def room(mod):
    """The room a module belongs to: itself, or the parent of a private child."""
    while mod in PRIVATE:
        mod = mod[:-1]
    return mod


def owner(parts):
    """The room of the longest module prefix of a path."""
    for n in range(len(parts), -1, -1):
        if tuple(parts[:n]) in modules:
            return room(tuple(parts[:n]))
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


rooms = sorted({room(m) for m in modules})
edges = {m: set() for m in rooms}
for mod, path in modules.items():
    if mod[-1:] == ("tests",):
        continue
    text = code(open(path, encoding="utf-8").read())
    # Test modules inside a file may use anything.
    text = text.split("#[cfg(test)]")[0]
    paths = []
    for use in re.findall(r"\buse\s+((?:crate|super)::[^;]+);", text, flags=re.S):
        paths += expand(use)
    paths += re.findall(r"\b((?:crate|super)(?:::[A-Za-z_*][A-Za-z0-9_]*)+)", text)
    for p in paths:
        parts = [x.split(" as ")[0] for x in re.sub(r"\s", "", p).split("::") if x]
        if parts[0] == "super":
            base = list(mod[:-1])
            parts = parts[1:]
            while parts and parts[0] == "super":
                base, parts = base[:-1], parts[1:]
            parts = base + parts
        else:
            parts = parts[1:]
        parts = [x for x in parts if x != "*"]
        target = owner(parts)
        source = room(mod)
        if target is not None and target != source and target != ():
            # A child module's own parent (api/x.rs -> api/mod.rs) counts as an edge too.
            edges[source].add(target)

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


for v in rooms:
    if v not in index:
        visit(v)

name = lambda m: "::".join(m) or "lib"
for comp in sccs:
    members = sorted(comp)
    print(f"import circle of {len(members)} modules:")
    for m in members:
        inside = sorted(name(t) for t in edges[m] if t in comp)
        print(f"  {name(m)} -> {', '.join(inside)}")
if not sccs:
    print(f"no import circle among {len(rooms)} modules ({len(modules)} files)")
sys.exit(1 if sccs else 0)
