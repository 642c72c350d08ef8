"""GET /models, GET /models/{model_id}, GET /models/{model_id}/card: the model registry."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse, Response

from acecal.api.deps import ServerState, get_state
from acecal.api.schemas import ErrorResponse, ModelInfo, ModelsResponse
from acecal.bundles import Bundle

router = APIRouter(tags=["models"])


def model_info(b: Bundle) -> ModelInfo:
    c = b.config
    return ModelInfo(
        id=c.id, description=c.description, labels=dict(c.labels), loss=c.loss.name, loss_params=dict(c.loss.params),
        metrics=dict(c.metrics), temperature=c.temperature, uncertainty_threshold=c.uncertainty_threshold,
        modality=c.modality, in_channels=c.in_channels, spacing=list(c.spacing), orientation=c.orientation,
        roi_size=list(c.roi_size), parent=c.parent, created=c.created,
    )


# plain `def`: the registry may rescan folders, which is file-system work for the thread pool, not the event loop
@router.get("/models", response_model=ModelsResponse, summary="List the models this server can run")
def list_models(state: ServerState = Depends(get_state)) -> ModelsResponse:
    return ModelsResponse(models=[model_info(b) for b in state.registry.list()], problems=state.registry.problems())


@router.get("/models/{model_id}", response_model=ModelInfo, summary="One model's description",
            responses={404: {"model": ErrorResponse, "description": "unknown model id"}})
def get_model(model_id: str, state: ServerState = Depends(get_state)) -> ModelInfo:
    return model_info(state.registry.get(model_id))


_ERROR_JSON = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


@router.get("/models/{model_id}/card", response_class=Response, summary="The model card (Markdown)",
            responses={200: {"content": {"text/markdown": {"schema": {"type": "string"}}},
                             "description": "the model card"},
                       404: {"content": _ERROR_JSON, "description": "unknown model id"},
                       422: {"content": _ERROR_JSON, "description": "invalid request"}})
def get_model_card(model_id: str, state: ServerState = Depends(get_state)) -> PlainTextResponse:
    b = state.registry.get(model_id)
    try:
        text = b.card_path.read_text(encoding="utf-8")
    except OSError:
        text = f"# {b.id}\n\n{b.config.description}\n\n(no model card)\n"
    return PlainTextResponse(text, media_type="text/markdown; charset=utf-8")
