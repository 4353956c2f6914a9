"""``sweep methods``, ``sweep evaluators``, ``sweep datasets``, ``sweep models``: what the
registries hold."""

from __future__ import annotations

import typer

from orchestrator.cli.render import Format, render


def register(app: typer.Typer) -> None:
    """Add the commands of this group to ``app``."""
    app.command()(methods)
    app.command()(evaluators)
    app.command()(datasets)
    app.command()(models)


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
                     "rate": info.rate_meaning if info.uses_rate else None,
                     "requires": list(info.requires), "params": _params(info.config)})
    flat = [dict(r, params=", ".join(f"{k}={v['default']!r}" for k, v in r["params"].items()),
                 rate=r["rate"] or "no rate", requires=", ".join(r["requires"]) or "-")
            for r in rows]
    text = render(flat, ["name", "description", "rate", "requires", "params"], fmt,
                  title="methods", json_payload=rows)
    if text is not None:
        print(text)


def _setting_defaults(paths: tuple[str, ...]) -> dict:
    """Defaults of the given ``evaluation`` settings (a section expands to its fields)."""
    from orchestrator.spec import EvaluationSettings

    defaults = EvaluationSettings().model_dump(mode="json", exclude={"metrics", "timeout_s"})
    out = {}
    for path in paths:
        value = defaults
        for part in path.split("."):
            value = value[part]
        if isinstance(value, dict):
            out.update({f"{path}.{k}": v for k, v in value.items()})
        else:
            out[path] = value
    return out


def evaluators(fmt: Format = typer.Option(Format.table, "--format")) -> None:
    """Evaluators: the metrics they produce (with direction), dataset kinds, settings."""
    from workers.evaluators import evaluators as registry

    rows = []
    for name, info in sorted(registry().items()):
        rows.append({"name": name, "description": info.description,
                     "metrics": dict(info.metrics), "kinds": list(info.kinds),
                     "settings": _setting_defaults(info.settings),
                     "batch_setting": ".".join(info.batch_setting or ()) or None})
    flat = [dict(r, metrics=", ".join(f"{m} ({d or 'info'})" for m, d in r["metrics"].items()),
                 kinds=", ".join(r["kinds"]),
                 settings=", ".join(f"{k}={v!r}" for k, v in r["settings"].items()))
            for r in rows]
    text = render(flat, ["name", "metrics", "kinds", "settings", "description"], fmt,
                  title="evaluators", json_payload=rows)
    if text is not None:
        print(text)


def datasets(fmt: Format = typer.Option(Format.table, "--format")) -> None:
    """Dataset formats: the kind of samples each yields and the fields it maps."""
    from workers.data import BUILTIN_DATASETS, SOURCES, formats

    rows = []
    for name, info in sorted(formats().items()):
        rows.append({"format": name, "kind": info.kind, "description": info.description,
                     "fields": dict(info.fields)})
    flat = [dict(r, fields=", ".join(f"{k}={v!r}" for k, v in r["fields"].items()) or "-")
            for r in rows]
    payload = {"formats": rows, "sources": list(SOURCES),
               "builtin": {f"builtin:{n}": list(s) for n, s in BUILTIN_DATASETS.items()}}
    text = render(flat, ["format", "kind", "fields", "description"], fmt, title="dataset formats",
                  json_payload=payload)
    if text is not None:
        print(text)


def models(fmt: Format = typer.Option(Format.table, "--format")) -> None:
    """Model families (matched by config.model_type), model sources and built-in models."""
    from workers.models import SOURCES, model_families
    from workers.models.builtin import BUILTIN_MODEL_NAMES

    rows = []
    for name, family in sorted(model_families().items()):
        rows.append({"family": name, "model_types": list(family.model_types),
                     "attention_heads": family.has_attention,
                     "vision_language": family.is_vision_language,
                     "post_norm": family.is_post_norm,
                     "description": (type(family).__doc__ or "").strip().splitlines()[0]})
    flat = [dict(r, model_types=", ".join(r["model_types"])) for r in rows]
    payload = {"families": rows, "sources": list(SOURCES),
               "builtin": [f"builtin:{n}" for n in BUILTIN_MODEL_NAMES]}
    text = render(flat, ["family", "model_types", "attention_heads", "vision_language",
                         "post_norm", "description"], fmt, title="model families",
                  json_payload=payload)
    if text is not None:
        print(text)
