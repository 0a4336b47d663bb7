"""The Litestar application: wiring of engine, adapters, database and routes, built from Settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import structlog
from advanced_alchemy.extensions.litestar import AsyncSessionConfig, SQLAlchemyAsyncConfig, SQLAlchemyPlugin
from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from feedback import adapter_registry, api_keys, migrate
from feedback.api import FeedbackController
from feedback.db import is_sqlite, make_async_engine
from feedback.ratings import RatingWriter
from serving import base_model
from serving.adapters.hot_swap import RegistryAccess, RegistryWatcher
from serving.adapters.manager import AdapterManager
from serving.api.admin import AdminController
from serving.api.auth import BEARER_SCHEME, PUBLIC_PATHS, KeyVerifier, admin_paths_guard, authentication_middleware
from serving.api.chat import ChatController
from serving.api.dependencies import DEPENDENCIES
from serving.api.errors import EXCEPTION_HANDLERS, document_errors
from serving.api.health import HealthController
from serving.api.models import ModelsController
from serving.api.web import WebController, static_router
from serving.completions import ChatService
from serving.engine.simple import SimpleEngine
from serving.metrics import Metrics, version_labels
from serving.settings import DEFAULT_ALIAS, Settings
from tuning.schedule import Scheduler
from tuning.settings import TuningSettings

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 1_048_576


@dataclass
class Runtime:
    """The expensive part: a loaded model and its engine (tests pass a tiny one)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    engine: SimpleEngine
    base_model_id: str


def build_runtime(settings: Settings) -> Runtime:
    source = base_model.resolve_base_model(settings)
    device = base_model.resolve_device(settings.device)
    dtype = base_model.resolve_dtype(settings.dtype, device)
    log.info("loading base model", model=source.model_id, path=str(source.path), device=str(device), dtype=str(dtype))
    model = base_model.load_model(source.path, device, dtype)
    tokenizer = base_model.load_tokenizer(source.path)
    from serving.engine.factory import build_engine  # here, not at the top: the engine's choice is this function's

    engine = build_engine(model, tokenizer, settings)
    return Runtime(model=model, tokenizer=tokenizer, engine=engine, base_model_id=source.model_id)  # type: ignore[arg-type]


class DatabaseNotMigrated(RuntimeError):
    pass


def prepare_database(settings: Settings) -> None:
    """The embedded SQLite is upgraded on start; a shared PostgreSQL is upgraded deliberately."""
    if is_sqlite(settings.database_url):
        migrate.upgrade(settings.database_url)
    elif not migrate.is_current(settings.database_url):
        raise DatabaseNotMigrated("the database schema is not at the newest revision: run `loraloop db upgrade` first")


def create_app(settings: Settings, runtime: Runtime | None = None, tuning: TuningSettings | None = None) -> Litestar:
    tuning = tuning if tuning is not None else TuningSettings()
    engine = make_async_engine(settings.database_url)
    db_config = SQLAlchemyAsyncConfig(
        engine_instance=engine,
        session_dependency_key="db_session",
        # Rows are read after commit to build responses: keep them loaded (no lazy IO outside the greenlet).
        session_config=AsyncSessionConfig(expire_on_commit=False),
        before_send_handler=None,  # handlers commit explicitly, before they answer
        create_all=False,
    )

    metrics = Metrics()

    def count_rating(served_by: str, alias: str | None, rating: int) -> None:
        direction = {1: "up", -1: "down"}.get(rating, "retracted")
        metrics.ratings.labels(*version_labels(served_by, alias), direction).inc()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(prepare_database, settings)
        rt = runtime or await anyio.to_thread.run_sync(build_runtime, settings)
        sessions = db_config.create_session_maker()
        app.state.key_verifier = KeyVerifier(sessions, settings.key_cache_seconds)
        async with sessions() as session:
            has_keys = await session.run_sync(api_keys.has_active_key)
        if settings.auth == "keys" and not has_keys:
            log.warning("no API keys yet, so every API call is refused: run `loraloop keys create --role admin`")
        async with sessions() as session, session.begin():
            await session.run_sync(adapter_registry.ensure_alias, DEFAULT_ALIAS)
        access = RegistryAccess(sessions)  # type: ignore[arg-type]
        manager = AdapterManager(
            rt.engine,
            settings.adapters_path,
            rt.base_model_id,
            max_rank=settings.max_lora_rank,
            find_version=access.find_version,
            report_failure=access.report_failure,
        )
        await rt.engine.start()
        metrics.bind_gauges(
            lambda: rt.engine.waiting, lambda: rt.engine.running, lambda: len(rt.engine.loaded_adapters)
        )
        app.state.metrics = metrics
        watcher = RegistryWatcher(manager, sessions, settings.swap_poll_seconds, metrics)  # type: ignore[arg-type]
        await watcher.sync_once()
        watcher.start()
        app.state.adapters = manager
        app.state.watcher = watcher
        app.state.chat = ChatService(
            rt.engine,
            manager,
            rt.tokenizer,
            rt.model.generation_config if rt.model.generation_config is not None else GenerationConfig(),
            sessions,  # type: ignore[arg-type]
            default_max_tokens=settings.default_max_tokens,
            max_context_tokens=settings.max_context_tokens,
            metrics=metrics,
        )
        scheduler = Scheduler(settings, tuning, sessions, rt.base_model_id)  # type: ignore[arg-type]
        app.state.scheduler = scheduler
        if tuning.schedule_enabled:
            scheduler.start()
        # Ratings commit in groups (feedback.ratings); each is counted once its transaction committed.
        app.state.rating_writer = RatingWriter(engine, on_committed=count_rating)
        app.state.ready = True
        log.info("ready", model=rt.base_model_id, aliases=sorted(manager.aliases))
        try:
            yield
        finally:
            app.state.ready = False
            await scheduler.stop()
            await watcher.stop()
            await rt.engine.stop()

    app = Litestar(
        route_handlers=[
            ChatController,
            ModelsController,
            FeedbackController,
            AdminController,
            HealthController,
            WebController,
            static_router,
        ],
        dependencies=DEPENDENCIES,
        plugins=[SQLAlchemyPlugin(config=db_config)],
        middleware=[authentication_middleware(settings)],
        guards=[admin_paths_guard],
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=OpenAPIConfig(
            title="loraloop",
            version="0.1.0",
            path="/schema",
            security=[{BEARER_SCHEME: []}],
            components=Components(
                security_schemes={
                    BEARER_SCHEME: SecurityScheme(
                        type="http", scheme="bearer", description="An API key from `loraloop keys create`."
                    )
                }
            ),
        ),
        debug=False,
        logging_config=None,  # structlog, configured by the CLI (serving.logs)
    )
    document_errors(app.openapi_schema, PUBLIC_PATHS)
    return app
