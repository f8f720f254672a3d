"""The options a preset gives its own projector, and only to it."""

from __future__ import annotations

from typing import Any


def preset_projector_options(projector: Any, own: str, options: dict[str, tuple[str, Any, Any]],
                             user: dict[str, Any] | None) -> dict[str, Any]:
    """``projector_options`` for the engine: the preset's ``options`` when ``projector`` is its own, then ``user``'s.

    Presets turn some of their arguments into options of their default projector (APOLLO's and Flora's
    ``distribution`` for ``"random"``, COAP's correction for ``"coap"``, DCT-AdamW's ``dct_path`` / ``dct_score``
    for ``"dct"``). With another projector (``APOLLO(projector="svd")``, the APOLLO paper's SVD variant) they do not
    apply: left at their defaults they are dropped; set to anything else they raise.

    Args:
        projector: the projector chosen at the optimizer level (a name).
        own: the preset's projector name.
        options: option name -> (argument name, value, the argument's default).
        user: the user's ``projector_options`` (always passed on; an unknown one raises at construction).

    Raises:
        ValueError: an argument meant for ``own`` set to a non-default value with another projector.
    """
    if projector == own:
        return {**{k: value for k, (_, value, _) in options.items()}, **(user or {})}
    for arg, value, default in options.values():
        if value != default:
            raise ValueError(f"Invalid {arg}: {value!r} applies to projector={own!r} only (got projector="
                             f"{projector!r}); drop it or pass that projector's options in projector_options")
    return dict(user or {})


__all__ = ["preset_projector_options"]
