"""The admin UI where analysts author, test and launch rules (docs/admin.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from api.services import Services

__all__ = ["mount_admin"]


def mount_admin(app: FastAPI, services: Services) -> None:
    """Mount the admin UI at ``/admin`` (imported lazily: the CLI's ``user``
    commands need only :mod:`api.admin.store`)."""
    from api.admin.app import mount_admin as _mount

    _mount(app, services)
