"""`docs/architectures.md`, generated from the definitions in `model_defs/` themselves.

    python -m moedsl.lang.docs_table            # (re)write docs/architectures.md
    python -m moedsl.lang.docs_table --check    # exit 1 if the committed file is out of date
    python -m moedsl.lang.docs_table --coverage # MoE model types of the installed transformers: covered, and why not

For every definition: its model_type(s), what it extends, its layer kinds and the `when`
expression that chooses each (with the `let`s it uses), every kind's quantization stages,
and for each MoE block the router, the shared experts, the experts' storage and layout,
the expert function and the checkpoint naming. The families that the language cannot
express yet are listed with the reason (`SKIPPED`, the data of `moedsl.lang.coverage`), and so are the MoE families that the
tiny-model builder supports but no definition covers yet. Nothing here needs torch or a
model: the page is a function of the `.moedef` files (and of the family lists in
`moedsl.models.tiny`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moedsl.lang import ir
from moedsl.lang.coverage import REASONS
from moedsl.lang.library import LIBRARY_DIR, library_files, load, parse_cached
from moedsl.lang.printer import _fn as printer_fn
from moedsl.lang.printer import _paths
from moedsl.lang.printer import expr

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "architectures.md"

# The families of transformers 5.2x that no definition covers, with the reason (moedsl.lang.coverage).
SKIPPED: dict[str, str] = REASONS


def _stages(items: tuple, prefix: str = "", out: dict[int, list[str]] | None = None) -> dict[int, list[str]]:
    """stage → the targets quantized in it (module paths; fused tensors as `experts:tensor`)."""
    out = {} if out is None else out
    for it in items:
        if isinstance(it, ir.Module):
            path = ir.join_path(prefix, _paths(it.names))
            if it.stage is not None:
                out.setdefault(it.stage, []).append(path + ("?" if it.optional else "")
                                                    + (" (grouped, ×E)" if it.grouped else ""))
            if it.children:
                _stages(it.children, path, out)
        elif isinstance(it, ir.FusedTensor) and it.stage is not None:
            roles = "+".join(it.roles)
            out.setdefault(it.stage, []).append(f"{prefix}.{it.name} ({roles})")
        elif isinstance(it, ir.Each):
            _stages(it.children, ir.join_path(prefix, "#"), out)
    return out


def _moe_blocks(items: tuple, prefix: str = ""):
    """(path, module) for every `:moe` block of a layer kind."""
    for it in items:
        if isinstance(it, ir.Module):
            path = ir.join_path(prefix, _paths(it.names))
            if it.role == "moe":
                yield path, it
            elif it.children:
                yield from _moe_blocks(it.children, path)


def _roles(items: tuple, role: str, prefix: str = ""):
    for it in items:
        if isinstance(it, ir.Module):
            path = ir.join_path(prefix, _paths(it.names))
            if it.role == role:
                yield path, it
            elif it.children and it.role != "experts":
                yield from _roles(it.children, role, path)


def _fn(f: ir.ExpertFn) -> str:
    return printer_fn(f).removeprefix("fn ")


def _tensor(t: ir.FusedTensor) -> str:
    split = f"{t.split}({', '.join(t.roles)})" if t.split != "one" else t.roles[0]
    bias = f" + bias `{t.bias}`" if t.bias else ""
    return f"`{t.name}` [{t.layout}] {split}{bias}"


def _names_used(e: ir.Expr | None, lets: set[str], found: list[str]) -> list[str]:
    if e is None:
        return found
    if isinstance(e, ir.Name) and e.id in lets and e.id not in found:
        found.append(e.id)
    for child in ("obj", "index", "operand", "left", "right"):
        sub = getattr(e, child, None)
        if sub is not None:
            _names_used(sub, lets, found)
    for sub in getattr(e, "args", ()) + getattr(e, "items", ()):
        _names_used(sub, lets, found)
    return found


def _experts_summary(moe: ir.Module, moe_path: str) -> dict[str, str]:
    kids = moe.children or ()
    router = [p for p, _ in _roles(kids, "router", moe_path)]
    shared = [p + ("?" if m.optional else "") for p, m in _roles(kids, "moe-share", moe_path)]
    # experts held by the block itself (grouped containers, `call(rows, sizes)`) or by its `:experts` module
    ex_path, ex = next(_roles(kids, "experts", moe_path), (moe_path, moe))
    items = ex.children or ()
    tensors = [c for c in items if isinstance(c, ir.FusedTensor)]
    fn = next(c for c in items if isinstance(c, ir.ExpertFn))
    scale = next((c.where for c in items if isinstance(c, ir.Scale)), "output")
    call = next((c.args for c in items if isinstance(c, ir.CallSig)), ("hidden", "index", "weights"))
    ckpts = [c for c in items if isinstance(c, ir.Ckpt)]
    if tensors and call == ir.GROUPED_CALL:
        storage = "grouped containers, each called `(rows, sizes)`: " + "; ".join(_tensor(t) for t in tensors)
    elif tensors:
        storage = "fused: " + "; ".join(_tensor(t) for t in tensors)
    else:
        storage = "ModuleList (`#`), one module per expert"
    if any(c.fused for c in ckpts):
        ckpt = "fused tensors under their runtime names"
    elif ckpts:
        ckpt = ", ".join(f"{c.role} `{c.template}`" for c in ckpts)
    else:
        ckpt = "runtime paths, one per expert"
    return {
        "router": ", ".join(f"`{r}`" for r in router) or "(none declared)",
        "shared experts": ", ".join(f"`{s}`" for s in shared) or "none",
        "experts": f"`{ex_path}`",
        "storage / layout": storage,
        "fn": f"`{_fn(fn)}`, routing weights scale the expert {scale}",
        "call": f"`call({', '.join(call)})`",
        "checkpoint names": ckpt,
    }


def _lets_used(d: ir.Definition) -> list[str]:
    """The `let`s the layer kinds' `when`s use, directly or through other lets, in order of use."""
    lets = {l.name: l for l in d.lets}
    used: list[str] = []
    for k in d.layers:
        _names_used(k.when, set(lets), used)
    for name in used:  # grows while iterating: lets used by used lets
        _names_used(lets[name].value, set(lets), used)
    return used


def _layer_kinds_cell(d: ir.Definition) -> str:
    parts = []
    for k in d.layers:
        parts.append(f"`{k.name}`: " + ("otherwise" if k.when is None else f"`{expr(k.when)}`"))
    lets = {l.name: l for l in d.lets}
    for name in _lets_used(d):
        parts.append(f"where `{name} = {expr(lets[name].value)}`")
    return "<br>".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _is_moe(d: ir.Definition) -> bool:
    return any(True for k in d.layers for _ in _moe_blocks(k.items))


def _covered_types(defs: list[ir.Definition]) -> set[str]:
    return {mt for d in defs for mt in d.header.matches}


def _not_yet_covered(covered: set[str]) -> list[str]:
    try:
        from moedsl.models.tiny import MOE_EXTRA_TINY, MOE_TINY
    except Exception:  # pragma: no cover - the page can be written without the model lists
        return []
    return sorted(t for t in (*MOE_TINY, *MOE_EXTRA_TINY) if t not in covered and t not in SKIPPED)


def render() -> str:
    files = library_files()
    entries = []
    for f in files:
        parsed = parse_cached(f)
        entries.append((parsed.header.name, f, parsed.header.extends, load(f)))
    entries.sort(key=lambda e: e[0])
    defs = [e[3] for e in entries]

    out: list[str] = []
    w = out.append
    w("# Architectures")
    w("")
    w("<!-- generated by `python -m moedsl.lang.docs_table` from model_defs/*.moedef; do not edit by hand -->")
    w("")
    n_moe = sum(1 for d in defs if _is_moe(d))
    w(f"{len(defs)} definitions in `model_defs/` ({n_moe} MoE, {len(defs) - n_moe} dense). Every one passes "
      "`moedsl validate` (structure, expressions, expert function, checkpoint names) against its tiny model "
      "(`tests/test_library.py`).")
    w("Stage numbers follow one convention: attention inputs `:0` (q/k/v, fused qkv; MLA q_a + kv_a), "
      "then the next projections (MLA q_b/kv_b), then o_proj, then the MLP's gate/up (routed and shared "
      "experts together), down last.")
    w("")
    w("## Summary")
    w("")
    w("| arch | model_type(s) | extends | layers | layer kinds (`when`) | experts / top-k |")
    w("|---|---|---|---|---|---|")
    for name, f, extends, d in entries:
        h = d.header
        moe = (f"`{expr(h.experts)}` / `{expr(h.top_k)}`" if h.experts is not None and _is_moe(d) else "dense")
        w("| " + " | ".join(_cell(c) for c in (
            f"[{name}](#{name})", ", ".join(f"`{m}`" for m in h.matches), f"`{extends}`" if extends else "",
            f"`{_paths(h.layers or ())}`", _layer_kinds_cell(d), moe)) + " |")
    w("")

    for name, f, extends, d in entries:
        h = d.header
        w(f"## {name}")
        w("")
        doc = [line.strip() for line in h.doc if line.strip()]
        if doc:
            w(" ".join(doc))
            w("")
        w(f"- file: `model_defs/{f.name}`" + (f", extends `{extends}`" if extends else ""))
        w(f"- model_type: {', '.join(f'`{m}`' for m in h.matches)}")
        root = f" (checkpoint root `{h.layers_ckpt}`)" if h.layers_ckpt else ""
        w(f"- decoder layers: `{_paths(h.layers or ())}`{root}; embeddings `{_paths(h.embed or ())}`; "
          f"final norm `{_paths(h.final_norm or ())}`; head `{_paths(h.lm_head or ())}`")
        if h.language_model is not None:
            towers = ", ".join(f"`{_paths(t.names)}`" + (" (optional)" if t.optional else "") for t in h.towers)
            w(f"- composite: language model `{_paths(h.language_model)}`"
              + (f", `config` is `{expr(h.text_config)}`" if h.text_config is not None else "")
              + f"; towers copied unquantized: {towers or 'none'}")
        if h.experts is not None:
            w(f"- experts: `{expr(h.experts)}`; top-k: `{expr(h.top_k)}`")
        lets = {l.name: l for l in d.lets}
        for name_ in _lets_used(d):
            w(f"- `let {name_} = {expr(lets[name_].value)}`")
        w("")
        w("| layer kind | when | stages |")
        w("|---|---|---|")
        for k in d.layers:
            stages = _stages(k.items)
            text = "<br>".join(f"`:{s}` " + ", ".join(f"`{p}`" for p in stages[s]) for s in sorted(stages))
            when = "otherwise" if k.when is None else f"`{expr(k.when)}`"
            w(f"| `{k.name}` | {_cell(when)} | {_cell(text)} |")
        w("")
        seen: set[str] = set()
        for k in d.layers:
            for path, moe in _moe_blocks(k.items):
                summary = _experts_summary(moe, path)
                key = repr((path, sorted(summary.items())))
                if key in seen:
                    continue
                seen.add(key)
                kinds = [kk.name for kk in d.layers if any(p == path and m == moe for p, m in _moe_blocks(kk.items))]
                w(f"MoE block `{path}` (kinds {', '.join(f'`{x}`' for x in kinds)}):")
                w("")
                for field, value in summary.items():
                    w(f"- {field}: {value}")
                w("")

    w("## Families not covered")
    w("")
    w("### Examined, and not expressible yet")
    w("")
    w("Composite (multimodal) wrappers, the language models inside them and models that are not causal LMs "
      "are listed by `python -m moedsl.lang.docs_table --coverage`, which counts the MoE model types of the "
      "installed transformers and gives every uncovered one its reason.")
    w("")
    w("| model_type | what is missing |")
    w("|---|---|")
    for mt in sorted(SKIPPED):
        w(f"| `{mt}` | {_cell(SKIPPED[mt])} |")
    w("")
    pending = _not_yet_covered(_covered_types(defs))
    if pending:
        w("### Not written yet")
        w("")
        w("MoE families that `moedsl.models.tiny` builds but no definition matches yet (not examined "
          "in detail; some are dense in their default config): " + ", ".join(f"`{t}`" for t in pending) + ".")
        w("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moedsl.lang.docs_table", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the file on disk is not up to date")
    ap.add_argument("--output", type=Path, default=DOC_PATH)
    ap.add_argument("--coverage", action="store_true",
                    help="print how many MoE model types of the installed transformers the library covers, and why "
                         "not the others (writes nothing)")
    args = ap.parse_args(argv)
    if args.coverage:
        from moedsl.lang import coverage

        return coverage.main([])
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.is_file() else None
        if current != text:
            print(f"{args.output} is out of date: run `python -m moedsl.lang.docs_table`", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} ({len(library_files())} definitions from {LIBRARY_DIR})", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
