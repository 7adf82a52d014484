"""MkDocs hooks: one page per registered method, generated from ``unipeft.list_methods()``.

Nothing here keeps a list of methods. At build time:

- ``on_config`` adds the generated pages to the nav, under the section that holds
  ``taxonomy.md`` (one sub-section per family), and appends at the end of the nav any page
  of ``docs/`` that the nav does not mention yet, so a new page never goes missing;
- ``on_files`` adds one virtual page per method, ``taxonomy/<id>.md`` (written nowhere on
  disk);
- ``on_page_markdown`` replaces the markers ``<!-- unipeft:family NAME -->`` and
  ``<!-- unipeft:methods-table -->`` in hand-written pages with lists generated from the
  registry.

A plugin that fails to load is logged as a warning, so ``mkdocs build --strict`` fails rather
than publish a taxonomy without it.
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from markdown.extensions.toc import slugify
from mkdocs.structure.files import File, Files
from unipeft.delta import FAMILIES

import unipeft

log = logging.getLogger("mkdocs.hooks.unipeft")

GENERATED_DIR = "taxonomy"
FAMILY_TITLES = {
    "additive": "Additive",
    "selective": "Selective",
    "reparameterized": "Reparameterized",
    "hybrid": "Hybrid",
    "moe": "Mixture of experts",
}
_FAMILY_MARK = re.compile(r"<!--\s*unipeft:family\s+([a-z_]+)\s*-->")
_TABLE_MARK = re.compile(r"<!--\s*unipeft:methods-table\s*-->")
_ARXIV = re.compile(r"arXiv:(\d{4}\.\d{4,5})")


# --------------------------------------------------------------------------- registry


def _methods() -> list[unipeft.Method]:
    return unipeft.list_methods()


def page_path(method_id: str) -> str:
    """The generated page of a method, relative to ``docs/``."""
    return f"{GENERATED_DIR}/{method_id}.md"


def _family_title(family: str) -> str:
    return FAMILY_TITLES.get(family, family.capitalize())


# --------------------------------------------------------------------------- nav


def _nav_mentions(nav: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(nav, str):
        found.add(nav)
    elif isinstance(nav, dict):
        for value in nav.values():
            found |= _nav_mentions(value)
    elif isinstance(nav, list):
        for item in nav:
            found |= _nav_mentions(item)
    return found


def _taxonomy_section(nav: list) -> list | None:
    """The nav list that holds ``taxonomy.md`` as a direct child (a section's pages)."""
    for item in nav:
        if item == "taxonomy.md" or (isinstance(item, dict) and "taxonomy.md" in item.values()):
            return nav
    for item in nav:
        for value in item.values() if isinstance(item, dict) else ():
            if isinstance(value, list) and (found := _taxonomy_section(value)) is not None:
                return found
    return None


def on_config(config: Any) -> Any:
    for failure in unipeft.plugin_failures():
        log.warning("unipeft plugin failed to load, its methods are missing: %s", failure)
    nav = config.nav
    if not nav:
        return config
    section = _taxonomy_section(nav)
    if section is None:
        section = [{"Taxonomy": "taxonomy.md"}]
        nav.append({"Taxonomy": section})
    by_family: dict[str, list[dict[str, str]]] = {}
    for m in _methods():
        by_family.setdefault(m.family, []).append({m.id: page_path(m.id)})
    for family in FAMILIES:
        if by_family.get(family):
            section.append({_family_title(family): by_family[family]})

    # pages of docs/ the nav does not mention yet go at the end, under their own title
    docs = Path(config.docs_dir)
    listed = _nav_mentions(nav)
    for path in sorted(docs.rglob("*.md")):
        rel = path.relative_to(docs).as_posix()
        if rel not in listed and not rel.startswith(f"{GENERATED_DIR}/"):
            log.info("docs page %s is not in mkdocs.yml's nav; appended at the end", rel)
            nav.append(rel)
    return config


# --------------------------------------------------------------------------- pages


def on_files(files: Files, config: Any) -> Files:
    for m in _methods():
        if files.get_file_from_path(page_path(m.id)) is not None:
            log.warning("docs/%s is generated from the registry; remove the file", page_path(m.id))
            continue
        files.append(File.generated(config, page_path(m.id), content=render_method(m)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if not _FAMILY_MARK.search(markdown) and not _TABLE_MARK.search(markdown):
        return markdown
    here = Path(page.file.src_uri).parent
    methods = _methods()

    def link(method_id: str) -> str:
        target = Path(page_path(method_id))
        rel = Path(*([".."] * len(here.parts)), target) if here.parts else target
        return rel.as_posix()

    def family_list(match: re.Match) -> str:
        family = match.group(1)
        if family not in FAMILIES:
            log.warning("%s: unknown family %r in a unipeft:family marker", page.file, family)
            return ""
        members = [m for m in methods if m.family == family]
        if not members:
            return "*No registered method of this family yet.*\n"
        return "\n".join(
            f"- [`{m.id}`]({link(m.id)}): {_escape(m.summary) or '(no summary)'}"
            + (f" *(plugin `{m.distribution}`)*" if _is_plugin(m) else "")
            for m in members
        )

    def table(_: re.Match) -> str:
        rows = [
            "| method | family | sites | mergeable | identity at init | budget field | from |",
            "|--------|--------|-------|-----------|------------------|--------------|------|",
        ]
        for m in methods:
            rows.append(
                f"| [`{m.id}`]({link(m.id)}) | {m.family} | {', '.join(m.site_kinds)} "
                f"| {_yes(m.mergeable)} | {_identity(m)} "
                f"| {_code(m.budget_field) if m.budget_field else '—'} "
                f"| `{m.distribution or '?'}` |"
            )
        return "\n".join(rows)

    markdown = _FAMILY_MARK.sub(family_list, markdown)
    return _TABLE_MARK.sub(table, markdown)


# --------------------------------------------------------------------------- one method


def render_method(m: unipeft.Method) -> str:
    fields = m.config.model_fields
    default_config = _default_config(m)
    lines = [
        f"# `{m.id}`",
        "",
        f"*{_escape(m.summary)}*" if m.summary else "",
        "",
        "<!-- generated by docs/hooks.py from unipeft.list_methods(); edit the method's "
        "registration, not this page -->",
        "",
        "| | |",
        "|---|---|",
        f"| family | [{m.family}](../taxonomy.md#{slugify(_family_title(m.family), '-')}) |",
        f"| distribution | `{m.distribution or '?'}`"
        + (" (a plugin)" if _is_plugin(m) else " (built in)")
        + " |",
        f"| config class | `{m.config.__module__}.{m.config.__qualname__}` |",
        f"| sites | {', '.join(m.site_kinds)} |",
        f"| default targets | {_targets(m, default_config)} |",
        f"| mergeable | {_yes(m.mergeable)} |",
        f"| identity at init | {_identity(m)} |",
        f"| budget field | {_budget(m)} |",
        f"| refuses at apply | {_escape(m.refuses) or '—'} |",
        f"| shares tensors across sites | {_shares(m)} |",
        f"| Hugging Face PEFT equivalent | {_peft_equivalent(m)} |",
        "",
    ]
    about = _about(m)
    if about:
        lines += ["## What it computes", "", about, ""]
    lines += [
        "## Trainable parameters",
        "",
        f"{_escape(m.formula)}",
        "",
        "## Configuration",
        "",
    ]
    if fields:
        lines += [
            "Keyword arguments of `unipeft.apply` and `DeltaModel.add_adapter`. An unknown "
            "field or a value out of bounds raises `unipeft.ConfigError` naming the field.",
            "",
            "| field | type | default | bounds | description |",
            "|-------|------|---------|--------|-------------|",
        ]
        for name, info in fields.items():
            lines.append(
                f"| `{name}` | {_type(info.annotation)} | {_default(info)} "
                f"| {_bounds(info) or '—'} | {_escape(info.description or '')} |"
            )
    else:
        lines.append("The method has no configuration fields.")
    lines += ["", "## Usage", ""]
    if _is_plugin(m):
        lines += [
            f"This method comes from the plugin distribution `{m.distribution}`: once that "
            "distribution is installed next to unipeft, its entry point registers the method.",
            "",
        ]
    args = [
        f"{name}={info.default!r},"
        for name, info in fields.items()
        if not info.is_required() and info.default_factory is None
    ]
    call = [f'model = unipeft.apply(backbone, "{m.id}")']
    if args:
        call = ["model = unipeft.apply(  # every field at its default", f'    backbone, "{m.id}",']
        call += [f"    {a}" for a in args] + [")"]
    lines += ["```python", "import unipeft", "", *call, "```", ""]
    lines += [
        "## References",
        "",
    ]
    refs = [r.strip() for r in m.paper.split(";") if r.strip()]
    lines += [f"- {_linkify(_escape(r))}" for r in refs] or ["- (none given)"]
    lines += [
        "",
        f"See also [all {m.family} methods](../taxonomy.md#{slugify(_family_title(m.family), '-')})"
        " and the [methods reference](../methods.md).",
        "",
    ]
    return "\n".join(lines)


def _about(m: unipeft.Method) -> str:
    """The docstring of the module that builds the method's deltas (formula, paper, PEFT
    equivalent, refused sites), as the method's author wrote it."""
    module = sys.modules.get(getattr(m.build, "__module__", "") or "")
    doc = inspect.getdoc(module) if module is not None else None
    return doc or ""


def _shares(m: unipeft.Method) -> str:
    if m.shared is None:
        return "no: every site's delta is its own"
    doc = inspect.getdoc(m.shared)
    what = f" ({_escape(doc.splitlines()[0])})" if doc else ""
    return (
        "yes: one shared module per adapter" + what + ", saved once; its trainable part is "
        "counted once"
    )


PEFT_BUILT_IN = {"lora": "`LORA`", "dora": "`LORA` with `use_dora=True`"}


def peft_types() -> dict[str, str]:
    """Method id -> the PEFT type(s) it converts to and from, for every convertible method."""
    from unipeft.features.interop.codecs import codec_for_type, registered_types

    out = dict(PEFT_BUILT_IN)
    out.setdefault("prompt_tuning", "`PROMPT_TUNING`")
    for peft_type in registered_types():
        codec = codec_for_type(peft_type)
        if codec is not None:
            out[codec.method] = f"`{codec.peft_type}`"
    if "ia3" in unipeft.registry().methods:
        out.setdefault("ia3", "`IA3`")
    return out


def _peft_equivalent(m: unipeft.Method) -> str:
    found = peft_types().get(m.id)
    if found is None:
        return "none (PEFT has no equivalent adapter type)"
    return f"{found}: `unipeft.interop.peft.load` and `save` convert both ways"


def readme_table() -> str:
    """README's method table, from the registry."""
    rows = [
        "| id | family | mergeable | identity at init | shares tensors | PEFT type |",
        "|----|--------|-----------|------------------|----------------|-----------|",
    ]
    types = peft_types()
    for m in _methods():
        name = f"`{m.id}`" + (f" (plugin `{m.distribution}`)" if _is_plugin(m) else "")
        rows.append(
            f"| {name} | {m.family} | {_yes(m.mergeable)} | {_identity(m)} "
            f"| {_yes(m.shared is not None)} | {types.get(m.id, '—')} |"
        )
    return "\n".join(rows)


def interop_table() -> str:
    """docs/interop.md's list of every convertible PEFT type, from the registry."""
    rows = ["| PEFT type | unipeft method |", "|-----------|----------------|"]
    for method, peft_type in sorted(peft_types().items(), key=lambda kv: kv[1]):
        rows.append(f"| {peft_type} | `{method}` |")
    return "\n".join(rows)


def methods_overview() -> str:
    """docs/methods.md's overview: every method with its formula, from the registry."""
    rows = [
        "| method | family | sites | mergeable | identity at init | trainable parameters |",
        "|--------|--------|-------|-----------|------------------|----------------------|",
    ]
    for m in _methods():
        rows.append(
            f"| [`{m.id}`]({page_path(m.id)}) | {m.family} | {', '.join(m.site_kinds)} "
            f"| {_yes(m.mergeable)} | {_identity(m)} | {_escape(m.formula)} |"
        )
    return "\n".join(rows)


_BLOCKS = {
    "readme-methods": readme_table,
    "peft-types": interop_table,
    "methods-overview": methods_overview,
}


def refresh(text: str) -> str:
    """``text`` with every generated block (``<!-- unipeft:NAME -->`` ...
    ``<!-- /unipeft:NAME -->``) rewritten from the registry."""
    for name, make in _BLOCKS.items():
        pattern = re.compile(
            rf"(<!-- unipeft:{name} -->\n)(?:.*?\n)?(<!-- /unipeft:{name} -->)", re.DOTALL
        )
        text = pattern.sub(lambda mt, make=make: mt.group(1) + make() + "\n" + mt.group(2), text)
    return text


def _default_config(m: unipeft.Method) -> Any | None:
    try:
        return m.config()
    except Exception:  # a config with required fields has no default instance
        return None


def _is_plugin(m: unipeft.Method) -> bool:
    return bool(m.distribution) and m.distribution != "unipeft"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _identity(m: unipeft.Method) -> str:
    if isinstance(m.identity_at_init, bool):
        return _yes(m.identity_at_init)
    config = _default_config(m)
    if config is None:
        return "depends on the configuration"
    return f"depends on the configuration ({_yes(m.is_identity_at_init(config))} at the defaults)"


def _targets(m: unipeft.Method, config: Any | None) -> str:
    if not callable(m.default_targets):
        return ", ".join(_code(t) for t in m.targets_for(config)) or "—"  # type: ignore[arg-type]
    if config is None:
        return "depend on the configuration"
    targets = ", ".join(_code(t) for t in m.targets_for(config))
    return f"{targets} at the defaults (they depend on the configuration)"


def _budget(m: unipeft.Method) -> str:
    if m.budget_field is None:
        return "— (fixed size: the budget planner does not search it)"
    return f"{_code(m.budget_field)} (the size `unipeft.plan_budget` searches)"


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return ", ".join(_code(repr(a)) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type):
        return annotation.__name__
    return _escape(str(annotation).replace("typing.", ""))


def _default(info: Any) -> str:
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        return "computed"
    return _code(repr(info.default))


def _bounds(info: Any) -> str:
    out = []
    for meta in info.metadata:
        for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sym} {value}")
        for attr, word in (("min_length", "length ≥"), ("max_length", "length ≤")):
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{word} {value}")
        value = getattr(meta, "multiple_of", None)
        if value is not None:
            out.append(f"multiple of {value}")
    return ", ".join(out)


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def _escape(text: str) -> str:
    """Text safe in a Markdown table cell or paragraph."""
    return text.replace("|", "\\|").replace("\n", " ").replace("*", "\\*").replace("_", "\\_")


def _linkify(text: str) -> str:
    return _ARXIV.sub(lambda m: f"[arXiv:{m.group(1)}](https://arxiv.org/abs/{m.group(1)})", text)


if __name__ == "__main__":  # python docs/hooks.py: rewrite the generated blocks in place
    root = Path(__file__).resolve().parent.parent
    for rel in ("README.md", "docs/interop.md", "docs/methods.md"):
        path = root / rel
        before = path.read_text(encoding="utf-8")
        after = refresh(before)
        if after != before:
            path.write_text(after, encoding="utf-8")
            print(f"updated {rel}")
