"""What the Lightning and Hugging Face callbacks share: the controller they hold, and the
``load_state_dict`` pre-hook that resizes a managed layer to a reduced checkpoint."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from .adapters import find_layers, get_adapter, resize_layers
from .controller import CompreSSM, ReductionEvent

__all__ = ["ControllerHolder", "resize_to_incoming_state"]

logger = logging.getLogger("compressm")


def resize_to_incoming_state(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """``load_state_dict`` pre-hook: resize ``module`` to the state size in ``state_dict``."""
    adapter = get_adapter(module)
    size = adapter.incoming_size(module, state_dict, prefix)
    if size is not None and size >= 1 and size != adapter.state_size(module):
        logger.info("compressm: resizing %s to %d states to load a state dict", prefix, size)
        resize_layers(module, {"": size})


class ControllerHolder:
    """The controller a callback builds when training starts, and the load hooks it installs.

    Subclasses set ``_built_at`` (the hook and the call that build the controller, for the
    message) and ``_layer_names`` (the managed layers, ``None`` for all).
    """

    _built_at: tuple[str, str]
    _controller: CompreSSM | None
    _load_hooks: list[RemovableHandle]

    @property
    def controller(self) -> CompreSSM:
        """The controller of the current training run.

        Raises
        ------
        RuntimeError
            Before it is built.
        """
        if self._controller is None:
            hook, call = self._built_at
            msg = f"The controller is built at `{hook}`; call `{call}` first."
            raise RuntimeError(msg)
        return self._controller

    @property
    def history(self) -> list[ReductionEvent]:
        """Events of the controller (``[]`` before training)."""
        return [] if self._controller is None else self._controller.history

    def _managed_layers(self, model: nn.Module, wanted: Any) -> dict[str, nn.Module]:
        found = find_layers(model)
        if wanted is None:
            return found
        names = set(wanted)
        return {name: layer for name, layer in found.items() if name in names}

    def _install_load_hooks(self, model: nn.Module, wanted: Any) -> None:
        """Make the managed layers of ``model`` resize themselves to incoming state dicts."""
        for layer in self._managed_layers(model, wanted).values():
            hook = layer.register_load_state_dict_pre_hook  # untyped in torch
            self._load_hooks.append(hook(resize_to_incoming_state))  # type: ignore[no-untyped-call]

    def _remove_load_hooks(self) -> None:
        for handle in self._load_hooks:
            handle.remove()
        self._load_hooks = []
