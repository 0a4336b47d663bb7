"""The `loraloop` command: serve, prepare the model, migrate the database, tune, steer adapters, manage keys.

Every setting is an option (`--database-url`) and an environment variable (`LORALOOP_DATABASE_URL`);
options win. Bad values stop the command with a sentence that says what to set.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from serving.logs import configure_logging
from serving.settings import DEFAULT_ALIAS, Settings

log = structlog.get_logger("loraloop")


def _settings_options(parser: argparse.ArgumentParser, model: type[BaseSettings], prefix: str = "") -> None:
    group = parser.add_argument_group(f"{model.__name__} (also {model.model_config.get('env_prefix', '')}*)")
    for name, field in model.model_fields.items():
        group.add_argument(
            f"--{prefix}{name.replace('_', '-')}",
            dest=f"{prefix.replace('-', '_')}{name}",
            default=None,
            help=(field.description or "").replace("%", "%%"),  # argparse %-formats help text ("95 %" broke it)
        )


def _build(model: type[BaseSettings], args: argparse.Namespace, prefix: str = "") -> Any:
    overrides = {
        name: value for name in model.model_fields if (value := getattr(args, f"{prefix}{name}", None)) is not None
    }
    return model(**overrides)


def _fail_on_bad_config(error: ValidationError, env_prefix: str) -> None:
    lines = ["loraloop: invalid configuration"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "settings"
        hint = f" (set {env_prefix}{field.upper()} or --{field.replace('_', '-')})" if item["loc"] else ""
        lines.append(f"  {field}: {item['msg']}{hint}")
    sys.exit("\n".join(lines))


def cmd_serve(settings: Settings, args: argparse.Namespace) -> None:
    import uvicorn

    from serving.api.app import create_app
    from serving.engine.cpu_threads import keep_this_thread_serial
    from tuning.settings import TuningSettings

    keep_this_thread_serial()  # the engine thread gets the cores (see serving/engine/cpu_threads.py)

    try:
        tuning = _build(TuningSettings, args, prefix="tuning_")
    except ValidationError as error:
        _fail_on_bad_config(error, "LORALOOP_TUNING_")
    uvicorn.run(
        create_app(settings, tuning=tuning),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


def cmd_prepare_model(settings: Settings, _: argparse.Namespace) -> None:
    from serving.base_model import resolve_base_model

    source = resolve_base_model(settings)
    print(f"{source.model_id}: {source.path}")


def cmd_db(settings: Settings, args: argparse.Namespace) -> None:
    from feedback import migrate

    if args.action == "upgrade":
        migrate.upgrade(settings.database_url, args.revision or "head")
    elif args.action == "downgrade":
        if not args.revision:
            sys.exit("loraloop db downgrade needs a revision (e.g. base, or -1)")
        migrate.downgrade(settings.database_url, args.revision)
    print(f"database at {'head' if migrate.is_current(settings.database_url) else 'an older revision'}")


def cmd_tune(settings: Settings, args: argparse.Namespace) -> None:
    from tuning.round import run_round
    from tuning.settings import TuningSettings

    try:
        tuning = _build(TuningSettings, args, prefix="tuning_")
    except ValidationError as error:
        _fail_on_bad_config(error, "LORALOOP_TUNING_")
    if args.trigger == "schedule":  # started by a server, which goes on serving on this machine
        from tuning.schedule import yield_cpu_to_serving

        yield_cpu_to_serving(tuning.scheduled_niceness)
    outcome = run_round(settings, tuning, alias=args.alias, trigger=args.trigger)
    print(json.dumps(outcome.summary(), default=str))  # one line: the last line of stdout is the result
    if outcome.status == "failed":
        sys.exit(1)


def cmd_adapters(settings: Settings, args: argparse.Namespace) -> None:
    from feedback import adapter_registry
    from feedback.db import make_sync_engine, session_scope

    engine = make_sync_engine(settings.database_url)
    with session_scope(engine) as session:
        if args.action == "list":
            for version in adapter_registry.list_versions(session):
                created = f"{version.created_at:%Y-%m-%d %H:%M}"
                print(f"{version.label:<20} {version.status:<10} {created}  {version.sha256[:12]}")
        elif args.action == "promote":
            name, _, number = (args.target or "").rpartition("@")
            record = adapter_registry.find_version(session, name, int(number)) if number.isdigit() else None
            if record is None:
                sys.exit(f"no version {args.target!r}: give it as alias@N")
            adapter_registry.promote(session, record.id, reason="manual promote")
            print(f"{record.label} is active")
        elif args.action in ("pin", "unpin"):
            adapter_registry.set_pinned(session, args.target or DEFAULT_ALIAS, args.action == "pin")
            print(f"{args.target or DEFAULT_ALIAS} {args.action}ned")
        elif args.action == "rollback":
            parent = adapter_registry.rollback(session, args.target or DEFAULT_ALIAS, reason="manual rollback")
            print(f"{args.target or DEFAULT_ALIAS} now serves {parent.label if parent else 'the base model'}")
    engine.dispose()


def cmd_runs(settings: Settings, args: argparse.Namespace) -> None:
    from feedback import tuning_runs
    from feedback.db import make_sync_engine, session_scope

    engine = make_sync_engine(settings.database_url)
    with session_scope(engine) as session:
        for run in tuning_runs.list_runs(session, limit=args.limit):
            took = f"{(run.finished_at - run.created_at).total_seconds():.0f}s" if run.finished_at else "-"
            print(
                f"#{run.id:<4} {run.adapter_name:<12} {run.trigger:<9} {run.status:<10} {run.stage:<12} "
                f"{run.progress:>5.0%} {took:>6}  {json.dumps(run.data_counts)}"
            )
    engine.dispose()


def cmd_keys(settings: Settings, args: argparse.Namespace) -> None:
    from feedback import api_keys
    from feedback.db import make_sync_engine, session_scope

    engine = make_sync_engine(settings.database_url)
    try:
        with session_scope(engine) as session:
            if args.action == "create":
                row, token = api_keys.create_key(session, args.role, tenant=args.tenant, name=args.name)
                tenant = f", tenant {row.tenant}" if row.tenant else ""
                print(f"created {row.role} key {row.id}{tenant}; it is shown only now, so store it:", file=sys.stderr)
                print(token)  # alone on stdout: `KEY=$(loraloop keys create ...)` works
            elif args.action == "list":
                for row in api_keys.list_keys(session):
                    state = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
                    print(
                        f"{row.id}  {row.role:<5}  {row.tenant or '-':<16}  {state:<24}  "
                        f"{row.created_at:%Y-%m-%d %H:%M}  {row.name}"
                    )
            else:
                row = api_keys.revoke_key(session, args.id)
                print(f"key {row.id} revoked (running servers stop accepting it within key_cache_seconds)")
    except api_keys.ApiKeyError as error:
        sys.exit(f"loraloop keys: {error}")
    finally:
        engine.dispose()


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], None]] = {
    "serve": cmd_serve,
    "prepare-model": cmd_prepare_model,
    "db": cmd_db,
    "tune": cmd_tune,
    "adapters": cmd_adapters,
    "runs": cmd_runs,
    "keys": cmd_keys,
}


def parser() -> argparse.ArgumentParser:
    from tuning.settings import TuningSettings

    common = argparse.ArgumentParser(add_help=False)
    _settings_options(common, Settings)
    root = argparse.ArgumentParser(prog="loraloop", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", parents=[common], help="run the OpenAI-compatible server (and its tuning schedule)")
    _settings_options(serve, TuningSettings, prefix="tuning-")
    sub.add_parser("prepare-model", parents=[common], help="convert the bundled model once (shows progress)")
    db = sub.add_parser("db", parents=[common], help="database migrations")
    db.add_argument("action", choices=["upgrade", "downgrade", "current"])
    db.add_argument("revision", nargs="?")
    tune = sub.add_parser("tune", parents=[common], help="run one tuning round now")
    tune.add_argument("--alias", default=DEFAULT_ALIAS, help="the adapter alias to tune (default: default)")
    tune.add_argument("--once", action="store_true", help="one round, then exit (for cron; the default)")
    tune.add_argument("--trigger", choices=["manual", "schedule"], default="manual", help=argparse.SUPPRESS)
    _settings_options(tune, TuningSettings, prefix="tuning-")
    adapters = sub.add_parser("adapters", parents=[common], help="list, promote or roll back adapter versions")
    adapters.add_argument("action", choices=["list", "promote", "rollback", "pin", "unpin"])
    adapters.add_argument("target", nargs="?", help="alias@N to promote, or the alias to roll back / pin / unpin")
    runs = sub.add_parser("runs", parents=[common], help="list tuning runs")
    runs.add_argument("--limit", type=int, default=20)
    keys = sub.add_parser("keys", help="create, list or revoke API keys (for LORALOOP_AUTH=keys)")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    create = keys_sub.add_parser("create", parents=[common], help="a new key, printed once")
    create.add_argument("--role", choices=["user", "admin"], required=True, help="admin may use the admin API")
    create.add_argument("--tenant", help="user keys only: the key may rate any completion of its tenant")
    create.add_argument("--name", default="", help="a note for `keys list` (who or what uses it)")
    keys_sub.add_parser("list", parents=[common], help="every key: id, role, tenant, state (never the secret)")
    revoke = keys_sub.add_parser("revoke", parents=[common], help="revoke a key by its id")
    revoke.add_argument("id", help="the key id `keys list` shows")
    return root


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        settings = _build(Settings, args)
    except ValidationError as error:
        _fail_on_bad_config(error, "LORALOOP_")
    configure_logging(settings.log_level, settings.log_format)
    COMMANDS[args.command](settings, args)


if __name__ == "__main__":
    main()
