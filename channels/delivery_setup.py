"""The delivery worker's channel parts, from settings (used by the container)."""

from __future__ import annotations

from typing import Any

from channels.policy import ChannelPolicy
from channels.push import pusher_from_settings
from channels.unsubscribe import Unsubscriber

__all__ = ["channel_parts"]


def channel_parts(settings: Any) -> dict[str, Any]:
    """``pusher``, ``policy``, ``unsubscriber`` and ``send_chunk`` keyword arguments of
    DeliveryWorker."""
    return {
        "pusher": pusher_from_settings(settings),
        "policy": ChannelPolicy.from_settings(settings),
        "unsubscriber": Unsubscriber.from_settings(settings),
        "send_chunk": settings.delivery_send_chunk,
    }
