"""``unipeft list``, ``unipeft plugins`` and ``unipeft inspect``: what is registered, where it
came from, and what a method would add to a backbone."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from torch import nn

import unipeft
from unipeft.contract.deltas import FAMILIES
from unipeft.contract.method import Method, site_kinds_of
from unipeft.contract.sites import Site

from ._backbones import Backbone, load_backbone, spec_forms
from ._common import CliError, cli_errors, print_json, stdout_console, warn

JSON_HELP = "Print JSON (machine readable, no markup) instead of tables."


def register(app: typer.Typer) -> None:
    """Add ``list``, ``plugins`` and ``inspect`` to ``app``."""
    app.command("list")(list_command)
    app.command("plugins")(plugins_command)
    app.command("inspect")(inspect_command)


# ---------------------------------------------------------------------------------- list


def list_command(
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    family: Annotated[
        str | None,
        typer.Option("--family", "-f", help=f"Only this family: {', '.join(FAMILIES)}."),
    ] = None,
) -> None:
    """List the registered methods, grouped by family."""
    with cli_errors():
        methods = _methods(family)
        if as_json:
            print_json([m.describe() for m in methods])
            return
        console = stdout_console()
        for fam in FAMILIES:
            rows = [m for m in methods if m.family == fam]
            if rows:
                console.print(_methods_table(fam, rows))


def _methods(family: str | None) -> list[Method]:
    if family is not None and family not in FAMILIES:
        raise CliError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")
    return [m for m in unipeft.list_methods() if family is None or m.family == family]


def _methods_table(family: str, methods: list[Method]) -> Table:
    table = Table(title=f"{family} methods", title_justify="left", show_lines=True)
    table.add_column("method", style="bold cyan", no_wrap=True)
    table.add_column("flags", no_wrap=True)
    table.add_column("description")
    for m in methods:
        info = m.describe()
        table.add_row(m.id, _flags(info), _description(info))
    return table


def _flags(info: dict[str, Any]) -> str:
    identity = info["identity_at_init"]
    identity_text = identity if isinstance(identity, str) else _yes_no(identity)
    return "\n".join(
        [
            f"mergeable: {_yes_no(info['mergeable'])}",
            f"identity at init: {identity_text}",
            f"sites: {', '.join(info['site_kinds'])}",
            f"budget field: {info['budget_field'] or '—'}",
            f"from: {escape(info['distribution'])}",
        ]
    )


def _description(info: dict[str, Any]) -> str:
    lines = [escape(info["summary"])] if info["summary"] else []
    lines.append(f"[bold]parameters:[/bold] {escape(info['formula'])}")
    lines.append(f"[dim]{escape(info['paper'])}[/dim]")
    return "\n".join(lines)


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


# ------------------------------------------------------------------------------- plugins


def plugins_command(
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Show the loaded plugins, their hooks and registrations, and the plugins that failed."""
    with cli_errors():
        plugins = _plugin_rows()
        failures = [
            {"plugin": f.plugin, "distribution": f.distribution, "stage": f.stage, "error": f.error}
            for f in unipeft.plugin_failures()
        ]
        if as_json:
            print_json({"plugins": plugins, "failures": failures})
            return
        console = stdout_console()
        console.print(_plugins_table(plugins))
        if failures:
            console.print(_failures_table(failures))
        else:
            console.print("No plugin failed.")


def _plugin_rows() -> list[dict[str, Any]]:
    """One row per loaded plugin. Methods are attributed by distribution: the registry
    records which distribution registered a method, not which of its plugins."""
    reg = unipeft.registry()
    pm = unipeft.plugin_manager()
    rows = []
    for name, dist in reg.plugins.items():
        plugin = pm.get_plugin(name)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or []) if plugin else []
        source = f"{dist} (plugin {name!r})"
        rows.append(
            {
                "name": name,
                "distribution": dist,
                "version": _version(dist),
                "hooks": hooks,
                "methods": sorted(m.id for m in reg.methods.values() if m.distribution == dist),
                "structure_maps": [m for m, src in reg.map_sources.items() if src == source],
            }
        )
    return rows


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def _plugins_table(plugins: list[dict[str, Any]]) -> Table:
    table = Table(title="plugins", title_justify="left", show_lines=True)
    for column in ("plugin", "distribution", "hooks", "methods", "structure maps"):
        table.add_column(column, no_wrap=column in ("plugin", "hooks"), overflow="fold")
    for p in plugins:
        dist = f"{p['distribution']} {p['version']}" if p["version"] else p["distribution"]
        table.add_row(
            f"[bold cyan]{escape(p['name'])}[/bold cyan]",
            escape(dist),
            "\n".join(p["hooks"]) or "—",
            escape(", ".join(p["methods"])) or "—",
            escape(", ".join(p["structure_maps"])) or "—",
        )
    return table


def _failures_table(failures: list[dict[str, Any]]) -> Table:
    table = Table(title="failed plugins", title_justify="left", title_style="bold red")
    for column in ("plugin", "distribution", "stage", "error"):
        table.add_column(column)
    for f in failures:
        table.add_row(*(escape(f[k]) for k in ("plugin", "distribution", "stage", "error")))
    return table


# ------------------------------------------------------------------------------- inspect


@dataclass
class RoleGroup:
    """The sites of one role in one tower."""

    role: str
    tower: str | None
    names: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def add(self, site: Site) -> None:
        self.names.append(site.name)
        self.kinds.extend(k for k in site_kinds_of(site) if k not in self.kinds)

    def as_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "tower": self.tower,
            "count": len(self.names),
            "names": list(self.names),
            "kinds": list(self.kinds),
        }


@dataclass
class MethodReport:
    """What a method with a config adds to a backbone."""

    method: str
    family: str
    config: dict[str, Any]
    targets: list[str]
    sites: int
    trainable: int
    total: int
    budget: str | None

    @property
    def percent(self) -> float:
        return 100 * self.trainable / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.method,
            "family": self.family,
            "config": self.config,
            "targets": self.targets,
            "sites": self.sites,
            "trainable": self.trainable,
            "total": self.total,
            "percent": self.percent,
            "budget": self.budget,
        }


def inspect_command(
    model: Annotated[str, typer.Argument(help=f"The backbone: {spec_forms()}.")],
    method: Annotated[
        str | None, typer.Option("--method", "-m", help="A method id (see `unipeft list`).")
    ] = None,
    targets: Annotated[
        list[str] | None,
        typer.Option(
            "--targets",
            "-t",
            help="Targets (roles like attn.q[0:4] or module regexes); repeat the option or "
            "separate with spaces. Default: the method's own.",
        ),
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set", "-s", help="A config field, key=value (value parsed as JSON if it can be)."
        ),
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            "--budget",
            "-b",
            help="Size the method to this fraction of the backbone (0.005 or 0.5%), searching "
            "its budget field.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Show a backbone's sites by role and, with --method, what the method would add."""
    with cli_errors():
        target_list = _split_targets(targets)
        config = parse_settings(settings or [])
        if method is None and (target_list or config or budget):
            raise CliError("--targets, --set and --budget describe a method: add --method ID")
        if method is not None:
            unipeft.get_method(method)  # an unknown id fails before the model is built
        backbone = load_backbone(model)
        summary = _backbone_summary(backbone)
        report = None
        if method is not None:
            report = method_report(backbone.model, method, target_list, config, budget)
        if as_json:
            print_json({**summary, "method": report.as_dict() if report else None})
            return
        _print_inspection(summary, report)


def _split_targets(targets: list[str] | None) -> list[str] | None:
    if not targets:
        return None
    return [t for text in targets for t in text.split()]


def parse_settings(settings: list[str]) -> dict[str, Any]:
    """``["r=8", "placement=houlsby"]`` -> ``{"r": 8, "placement": "houlsby"}``."""
    config: dict[str, Any] = {}
    for item in settings:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CliError(f"--set expects key=value, got {item!r}")
        try:
            config[key] = json.loads(text)
        except json.JSONDecodeError:
            config[key] = text
    return config


def _backbone_summary(backbone: Backbone) -> dict[str, Any]:
    model = backbone.model
    sites = unipeft.inspect_sites(model)
    groups: dict[tuple[str, str | None], RoleGroup] = {}
    for site in sites:
        if site.role is not None:
            groups.setdefault((site.role, site.tower), RoleGroup(site.role, site.tower)).add(site)
    return {
        "model": backbone.spec,
        "class": type(model).__name__,
        "source": backbone.source,
        "parameters": _count(model),
        "structure_map": unipeft.registry().pick_map(model).name,
        "roles": [g.as_dict() for g in groups.values()],
        "module_sites": sum(1 for s in sites if s.role is None),
    }


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def method_report(
    model: nn.Module,
    method: str,
    targets: list[str] | None,
    config: dict[str, Any],
    budget: str | None,
) -> MethodReport:
    """Build ``method`` on ``model`` (sized by :func:`unipeft.plan_budget` when ``budget``
    is given), count what it trains, and take it off again."""
    spec = unipeft.get_method(method)
    total = _count(model)
    planned: int | None = None
    if budget is not None:
        plan = unipeft.plan_budget(model, spec.id, budget, targets=targets, **config)
        config, targets, planned = dict(plan.config), list(plan.targets), plan.trainable
    delta_model = unipeft.apply(model, spec.id, targets=targets, **config)
    try:
        adapter = delta_model.adapters["default"]
        built = delta_model.num_trainable_parameters()
        report = MethodReport(
            method=spec.id,
            family=spec.family,
            config=adapter.config.model_dump(mode="json"),
            targets=list(adapter.targets),
            sites=len(adapter.sites),
            trainable=built if planned is None else planned,
            total=total,
            budget=budget,
        )
    finally:
        delta_model.unload()
    if planned is not None and planned != built:
        warn(
            f"the budget plan counts {planned:,} trainable parameters but the built adapter "
            f"has {built:,}: {spec.id}'s parameter formula disagrees with its deltas"
        )
    return report


def _print_inspection(summary: dict[str, Any], report: MethodReport | None) -> None:
    console = stdout_console()
    console.print(
        f"[bold]{escape(summary['model'])}[/bold]: {summary['class']}, "
        f"{summary['parameters']:,} parameters, structure map "
        f"[cyan]{summary['structure_map']}[/cyan]"
    )
    console.print(_roles_table(summary["roles"]))
    console.print(
        f"[dim]{summary['module_sites']} more sites reachable by module name "
        "(targets such as 're:.*query').[/dim]"
    )
    if report is not None:
        console.print(_report_table(report))


def _roles_table(roles: list[dict[str, Any]]) -> Table:
    table = Table(title="sites by role", title_justify="left")
    table.add_column("role", style="bold cyan", no_wrap=True)
    table.add_column("tower")
    table.add_column("count", justify="right")
    table.add_column("example names", overflow="fold")
    table.add_column("kinds")
    for r in roles:
        names = r["names"]
        examples = names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}"
        table.add_row(
            r["role"], r["tower"] or "—", str(r["count"]), escape(examples), ", ".join(r["kinds"])
        )
    return table


def _report_table(report: MethodReport) -> Table:
    title = f"{report.method} ({report.family})"
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", overflow="fold")
    table.add_row("config", escape(json.dumps(report.config)))
    table.add_row("targets", escape(", ".join(report.targets)))
    table.add_row("sites", str(report.sites))
    table.add_row("trainable", f"{report.trainable:,}")
    table.add_row("of backbone", f"{report.percent:.4g}% of {report.total:,}")
    if report.budget is not None:
        table.add_row("budget", escape(report.budget))
    return table
