"""``sweep methods``: what the registries hold."""

from __future__ import annotations

import typer

from orchestrator.cli.render import Format, render


def register(app: typer.Typer) -> None:
    """Add the commands of this group to ``app``."""
    app.command()(methods)


def _params(config_cls) -> dict:
    schema = config_cls.model_json_schema(by_alias=True)
    out = {}
    for name, prop in schema.get("properties", {}).items():
        kind = prop.get("type") or " | ".join(
            str(p.get("type", p.get("const", ""))) for p in prop.get("anyOf", [])) or (
            "enum" if "enum" in prop else "")
        entry = {"type": kind, "default": prop.get("default")}
        if "enum" in prop:
            entry["choices"] = prop["enum"]
        if "description" in prop:
            entry["description"] = prop["description"]
        out[name] = entry
    return out


def methods(fmt: Format = typer.Option(Format.table, "--format")) -> None:
    """Compression methods, their parameters and what their rate means."""
    from workers.methods import methods as registry

    rows = []
    for name, info in sorted(registry().items()):
        rows.append({"name": name, "description": info.description,
                     "rate": info.rate_meaning, "params": _params(info.config)})
    flat = [dict(r, params=", ".join(f"{k}={v['default']!r}" for k, v in r["params"].items()))
            for r in rows]
    text = render(flat, ["name", "description", "rate", "params"], fmt, title="methods",
                  json_payload=rows)
    if text is not None:
        print(text)
