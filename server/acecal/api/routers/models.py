"""GET /models, GET /models/{model_id}, GET /models/{model_id}/card: the model registry."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response

from acecal.api.deps import RegistryDep, ServicesDep
from acecal.api.schemas import ErrorResponse, ModelInfo, ModelsResponse

router = APIRouter(tags=["models"])

_ERROR_JSON = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


# plain `def`: the registry may rescan folders, which is file-system work for the thread pool, not the event loop
@router.get("/models", response_model=ModelsResponse, summary="List the models this server can run")
def list_models(services: ServicesDep) -> ModelsResponse:
    registry = services.registry
    default = services.default_model().served
    return ModelsResponse(
        models=[ModelInfo(**b.describe(), default=b.id == default) for b in registry.list()],
        problems=registry.problems(),
    )


@router.get(
    "/models/{model_id}",
    response_model=ModelInfo,
    summary="One model's description",
    responses={404: {"model": ErrorResponse, "description": "unknown model id"}},
)
def get_model(model_id: str, services: ServicesDep) -> ModelInfo:
    bundle = services.registry.get(model_id)
    return ModelInfo(**bundle.describe(), default=bundle.id == services.default_model().served)


@router.get(
    "/models/{model_id}/card",
    response_class=Response,
    summary="The model card (Markdown)",
    responses={
        200: {"content": {"text/markdown": {"schema": {"type": "string"}}}, "description": "the model card"},
        404: {"content": _ERROR_JSON, "description": "unknown model id"},
        422: {"content": _ERROR_JSON, "description": "invalid request"},
    },
)
def get_model_card(model_id: str, registry: RegistryDep) -> PlainTextResponse:
    b = registry.get(model_id)
    try:
        text = b.card_path.read_text(encoding="utf-8")
    except OSError:
        text = f"# {b.id}\n\n{b.config.description}\n\n(no model card)\n"
    return PlainTextResponse(text, media_type="text/markdown; charset=utf-8")
