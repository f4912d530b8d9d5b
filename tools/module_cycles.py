#!/usr/bin/env python3
"""Lists the gateway's top-level modules that import each other in a circle, and fails if any do.

Each file under gateway/src belongs to the top-level module it sits in (`api/groups.rs` to `api`,
`app.rs` to `app`); an edge A -> B is any `crate::B` path in A's files, `use crate::{B, ...}`
included. lib.rs and main.rs are the root and are left out. Prints the edges with --graph.
Run: python3 tools/module_cycles.py [--graph] [--src DIR]
"""
import pathlib
import re
import sys

SRC = pathlib.Path(
    sys.argv[sys.argv.index("--src") + 1]
    if "--src" in sys.argv
    else pathlib.Path(__file__).resolve().parent.parent / "gateway" / "src"
)


def top_level(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".rs")


def crate_refs(text: str) -> set[str]:
    text = re.sub(r"//[^\n]*", "", text)
    refs = set(re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", text))
    # `use crate::{a, b::c, d::{e, f}}`: the first segment of each item at the first brace level.
    for block in re.finditer(r"\bcrate::\{", text):
        depth, i, items = 1, block.end(), ""
        while i < len(text) and depth:
            ch = text[i]
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if depth == 1 and ch not in "{}":
                items += ch
            i += 1
        for item in items.split(","):
            first = re.match(r"\s*([a-z_][a-z0-9_]*)", item)
            if first:
                refs.add(first.group(1))
    return refs


def main() -> int:
    files = [p for p in SRC.rglob("*.rs") if p.name not in ("lib.rs", "main.rs") or p.parent != SRC]
    modules = {top_level(p) for p in files}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for path in files:
        src = top_level(path)
        text = path.read_text()
        for ref in crate_refs(text):
            # keep only the first segment after `crate::` and ignore paths inside a module's own tree
            if ref in modules and ref != src:
                edges[src].add(ref)
    if "--graph" in sys.argv:
        for m in sorted(edges):
            print(f"{m} -> {', '.join(sorted(edges[m])) or '(nothing)'}")
    # Tarjan's strongly connected components.
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
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
                sccs.append(sorted(comp))

    for m in sorted(edges):
        if m not in index:
            visit(m)
    if sccs:
        for comp in sccs:
            print("import circle:", " <-> ".join(comp))
            for a in comp:
                print(f"  {a} -> {', '.join(sorted(edges[a] & set(comp)))}")
        return 1
    print(f"no import circles among {len(modules)} top-level modules of gateway/src")
    return 0


if __name__ == "__main__":
    sys.exit(main())
