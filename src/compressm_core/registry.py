"""A registry of adapters by layer class, shared by the torch and JAX packages."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from .layers import counterpart_layers

__all__ = ["AdapterRegistry"]

A = TypeVar("A")


class AdapterRegistry(Generic[A]):
    """Adapters by layer class, or by qualified class name, found along the layer's MRO.

    A class registered by name (``"package.module.Class"``) is matched without importing its
    package. A lookup walks ``type(layer).__mro__`` and returns the adapter of the nearest
    registered class, whether registered by class or by name.

    Parameters
    ----------
    base : type
        The layer base class of the framework (``torch.nn.Module``, ``flax.nnx.Module``).
    base_name : str
        Its name in messages.
    package : str
        The framework package, named in the message of a failed lookup.
    adapter_types : tuple of type, optional
        The accepted adapter classes (default: any object).
    validate : callable, optional
        Called with each adapter after its type check, to raise on a bad one.

    Examples
    --------
    >>> from compressm_core.registry import AdapterRegistry
    >>> registry: AdapterRegistry[str] = AdapterRegistry(object, "object", "mypackage", (str,))
    >>> registry.register(int, "for ints")
    >>> registry.get(True)  # bool is a subclass of int
    'for ints'
    """

    def __init__(
        self,
        base: type,
        base_name: str,
        package: str,
        adapter_types: tuple[type, ...] = (object,),
        validate: Callable[[A], None] | None = None,
    ) -> None:
        self.base, self.base_name, self.package = base, base_name, package
        self.adapter_types, self.validate = adapter_types, validate
        self._by_type: dict[type, A] = {}
        self._by_name: dict[str, A] = {}

    def check_layer_type(self, layer_type: object) -> None:
        """Check that ``layer_type`` is a subclass of ``base`` or a (qualified class) name.

        Raises
        ------
        TypeError
            If it is neither.
        """
        if isinstance(layer_type, str):
            return
        if not (isinstance(layer_type, type) and issubclass(layer_type, self.base)):
            msg = (
                f"`layer_type` must be a {self.base_name} subclass or a qualified class name; "
                f"received {layer_type!r}."
            )
            raise TypeError(msg)

    def register(self, layer_type: type | str, adapter: A) -> None:
        """Register ``adapter`` for ``layer_type`` and its subclasses (replacing an earlier one).

        Raises
        ------
        TypeError
            If ``layer_type`` is neither a subclass of ``base`` nor a string, or ``adapter`` is
            not one of ``adapter_types``.
        """
        self.check_layer_type(layer_type)
        if not isinstance(adapter, self.adapter_types):
            names = " or a ".join(t.__name__ for t in self.adapter_types)
            msg = f"`adapter` must be a {names}; received {type(adapter).__name__}."
            raise TypeError(msg)
        if self.validate is not None:
            self.validate(adapter)
        if isinstance(layer_type, str):
            self._by_name[layer_type] = adapter
        else:
            self._by_type[layer_type] = adapter

    def lookup(self, layer: object) -> A | None:
        """The adapter of the nearest registered class of ``layer``, or ``None``."""
        for klass in type(layer).__mro__:
            if klass in self._by_type:
                return self._by_type[klass]
            named = self._by_name.get(f"{klass.__module__}.{klass.__qualname__}")
            if named is not None:
                return named
        return None

    def get(self, layer: object) -> A:
        """The adapter of the nearest registered class of ``layer``.

        Raises
        ------
        TypeError
            If no class of ``layer`` is registered.
        """
        adapter = self.lookup(layer)
        if adapter is not None:
            return adapter
        names = [k.__name__ for k in self._by_type] + list(self._by_name)
        msg = (
            f"No adapter registered for `layer` of type {type(layer).__name__}; registered: "
            f"{', '.join(sorted(names))}. Use {self.package}.register_adapter to add one."
        )
        raise TypeError(msg)

    def match_layers(
        self,
        models: Iterable[object],
        layers: Mapping[str, Any],
        find_layers: Callable[[Any], Mapping[str, Any]],
        argument: str = "extra_models",
    ) -> list[dict[str, Any]]:
        """For every model of ``models`` (a copy such as an EMA model), its layer matching each
        of ``layers``: the same name, or the only one ending in ``"." + name``, of the same
        type and state size (:func:`~compressm_core.layers.counterpart_layers`, the sizes from
        the adapters' ``state_size``).

        Parameters
        ----------
        models : iterable
            The copies.
        layers : mapping
            ``{name: layer}`` of the model.
        find_layers : callable
            ``model -> {name: layer}``: the supported layers of a copy.
        argument : str, optional
            The argument ``models`` came from, for the messages.

        Returns
        -------
        list of dict
            ``{name: counterpart}`` for every copy.

        Raises
        ------
        TypeError
            A copy that is not a ``base`` instance.
        ValueError
            A layer without exactly one counterpart, or one of another type or state size.
        """
        matched = []
        for i, model in enumerate(models):
            if not isinstance(model, self.base):
                msg = f"`{argument}[{i}]` must be a {self.base_name}; received {type(model)}."
                raise TypeError(msg)
            matched.append(
                counterpart_layers(
                    layers, find_layers(model), self._state_size, f"{argument}[{i}]"
                )
            )
        return matched

    def _state_size(self, layer: object) -> int:
        adapter: Any = self.get(layer)
        return int(adapter.state_size(layer))
