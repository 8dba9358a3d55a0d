"""What the routes work with: the ingress replica's collaborators, made once by its constructor
(``deployment.py``) and handed to each route by the :data:`Svc` dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..config import AppSettings
from .auth import Authenticator
from .keys import KeyStore
from .limits import Limits
from .metrics import IngressMetrics
from .moderation import Moderator
from .replies import Replies
from .responses import ResponsesApi
from .turns import TurnRunner


@dataclass
class Services:
    settings: AppSettings
    model: DeploymentHandle
    dialogue: DeploymentHandle
    ops: DeploymentHandle | None
    moderator: Moderator | None
    metrics: IngressMetrics
    turns: TurnRunner
    replies: Replies
    auth: Authenticator
    limits: Limits
    key_stores: list[KeyStore]  # where keys are looked up; the first one takes new keys
    responses: ResponsesApi

    @property
    def model_name(self) -> str:
        return self.settings.model.served_model_name


def current_services() -> Services:
    """The collaborators of the ingress replica serving this request."""
    return serve.get_replica_context().servable_object.services


Svc = Annotated[Services, Depends(current_services)]
