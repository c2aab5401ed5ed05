"""The LEGO authors' network (``EDMPrecondLEGO`` in a ``network-snapshot-*.pkl``) as a LegoModel.

The snapshot is read by the inert unpickler (unpickle.py) into records; this module walks their
module tree, checks that every layer is one it understands, infers the whole model config from the
records and the weight shapes, and maps every weight onto :class:`lego_export.model.LegoModel`.

Where the authors' network differs from this project's models:

- their label embedding is a Linear *with* bias over the one-hot: ``LegoConfig.label_bias``;
- their 2-D position embedding puts the column half first: ``BrickConfig.pos_halves = "col-row"``
  (inferred from the embedding the file stores, which must be one of the two fixed ones);
- their coordinate channels are (row, column), ours (x = column, y = row): the patch embedding's
  two coordinate input channels are swapped, which computes exactly the same function.

Everything else (timestep embedding, patch and tile order, adaLN chunk order, attention scale,
tanh GELU, LayerNorm eps, c_noise = ln(sigma) / 4, guidance over the whole estimate) is the same,
and is checked where the file records it.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lego_export.config import BrickConfig, LegoConfig
from lego_export.edm import EDMConfig
from lego_export.errors import LegoError
from lego_export.model import LegoModel, sincos_position_embedding
from lego_export.official.unpickle import Record, TensorRef, load_inert

PERSISTENT_HOOK = "torch_utils.persistence._reconstruct_persistent_obj"
NETWORK_CLASS = "EDMPrecondLEGO"

# Where the authors' sampler clamps its schedule (generate.py: max(0.002, net.sigma_min), min(80, ...)).
SCHEDULE_SIGMA_MIN, SCHEDULE_SIGMA_MAX = 0.002, 80.0


@dataclass
class Layer:
    """One module of the authors' network as the file describes it (never the module itself)."""

    path: str
    kind: str  # class name, e.g. "DiTBlock"
    attrs: dict  # the module's plain attributes (its __dict__ without torch's bookkeeping)
    tensors: dict[str, Tensor] = field(default_factory=dict)  # parameters and buffers
    children: dict[str, Layer] = field(default_factory=dict)


# -- reading the tree ------------------------------------------------------------------------------


def read_network(path: str | Path, entry: str = "ema") -> tuple[Layer, dict]:
    """The module tree of one network of a snapshot, and the attributes of its loss (EDM constants)."""
    top = load_inert(path)
    if not isinstance(top, dict):
        raise LegoError(f"{path} holds a {_kind_of(top)}, not a network-snapshot dict (ema, loss_fn, ...)")
    if entry not in top:
        names = ", ".join(sorted(str(k) for k in top)) or "none"
        raise LegoError(f"{path} has no entry {entry!r} (entries: {names})")
    kind, _ = _class_and_state(top[entry])
    if kind != NETWORK_CLASS:
        raise LegoError(f"{path}: entry {entry!r} is a {kind}, not the LEGO network {NETWORK_CLASS}")
    root = module_tree(top[entry], "")
    loss = top.get("loss_fn")
    loss_attrs = _class_and_state(loss)[1] if isinstance(loss, Record) else {}
    return root, loss_attrs if isinstance(loss_attrs, dict) else {}


def _class_and_state(obj) -> tuple[str, object]:
    """(class name, state) of a record; objects saved through the authors' persistence hook keep
    both in the hook's argument, next to the module source that is never run."""
    if not isinstance(obj, Record):
        return _kind_of(obj), None
    if obj.qualname == PERSISTENT_HOOK:
        meta = obj.args[0] if len(obj.args) == 1 and isinstance(obj.args[0], dict) else {}
        if meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
            raise LegoError("a persistent object of the file is not a class instance")
        return meta["class_name"], meta.get("state")
    return obj.name, obj.state


def _kind_of(obj) -> str:
    return obj.qualname if isinstance(obj, Record) else type(obj).__name__


def module_tree(obj, path: str) -> Layer:
    """The Layer tree of a record of a torch module: children, tensors and attributes."""
    kind, state = _class_and_state(obj)
    where = path or "the network"
    if not isinstance(state, dict) or not isinstance(state.get("_modules"), dict):
        raise LegoError(f"{where} ({kind}) is not a saved torch module")
    layer = Layer(path, kind, {k: v for k, v in state.items() if not k.startswith("_") and k != "training"})
    layer.attrs["init_kwargs"] = state.get("_init_kwargs") if isinstance(state.get("_init_kwargs"), dict) else {}
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None:
                continue
            if not isinstance(value, TensorRef):
                raise LegoError(f"{_join(path, name)} is a {_kind_of(value)}, not a tensor")
            layer.tensors[name] = value.tensor
    for name, child in state["_modules"].items():
        if child is not None:
            layer.children[name] = module_tree(child, _join(path, name))
    return layer


def flatten(root: Layer) -> dict[str, Layer]:
    """Every layer of the tree by its dotted path ("" is the root)."""
    out = {root.path: root}
    for child in root.children.values():
        out.update(flatten(child))
    return out


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# -- what the network must look like -----------------------------------------------------------------

_BRICK = r"model\.model\.\d+"
_BLOCK = _BRICK + r"\.blocks\.\d+"
_LAYOUT: list[tuple[str, str]] = [
    ("", NETWORK_CLASS),
    (r"model", "LEGO"),
    (r"model\.model", "ModuleList"),
    (_BRICK, "LEGO_module"),
    (_BRICK + r"\.x_embedder", "PatchEmbed"),
    (_BRICK + r"\.x_embedder\.proj", "Conv2d"),
    (_BRICK + r"\.x_embedder\.norm", "Identity"),
    (_BRICK + r"\.blocks", "ModuleList"),
    (_BLOCK, "DiTBlock"),
    (_BLOCK + r"\.norm[12]", "LayerNorm"),
    (_BLOCK + r"\.attn", "Attention"),
    (_BLOCK + r"\.attn\.(qkv|proj)", "Linear"),
    (_BLOCK + r"\.attn\.(q_norm|k_norm|norm)", "Identity"),
    (_BLOCK + r"\.attn\.(attn_drop|proj_drop)", "Dropout"),
    (_BLOCK + r"\.mlp", "Mlp"),
    (_BLOCK + r"\.mlp\.(fc1|fc2)", "Linear"),
    (_BLOCK + r"\.mlp\.act", "GELU"),
    (_BLOCK + r"\.mlp\.(drop1|drop2)", "Dropout"),
    (_BLOCK + r"\.mlp\.norm", "Identity"),
    (rf"({_BLOCK}|{_BRICK}\.final_layer)\.adaLN_modulation", "Sequential"),
    (rf"({_BLOCK}|{_BRICK}\.final_layer)\.adaLN_modulation\.0", "SiLU"),
    (rf"({_BLOCK}|{_BRICK}\.final_layer)\.adaLN_modulation\.1", "Linear"),
    (_BRICK + r"\.final_layer", "FinalLayer"),
    (_BRICK + r"\.final_layer\.norm_final", "LayerNorm"),
    (_BRICK + r"\.final_layer\.linear", "Linear"),
    (r"model\.t_embedder", "TimestepEmbedder"),
    (r"model\.t_embedder\.mlp", "Sequential"),
    (r"model\.t_embedder\.mlp\.[02]", "Linear"),
    (r"model\.t_embedder\.mlp\.1", "SiLU"),
    (r"model\.t_embedder\.positional_embedding", "PositionalEmbedding"),
    (r"model\.y_embedder", "LabelEmbedder"),
    (r"model\.y_embedder\.embedding_table", "Linear"),
]


def check_layout(layers: dict[str, Layer]) -> None:
    """Refuse any layer that is not where the authors' LEGO network has it, or set up differently."""
    if "model.map_augment" in layers:
        raise LegoError("the network conditions on augmentation labels (augment_dim > 0): not supported")
    for path, layer in layers.items():
        expected = next((kind for pattern, kind in _LAYOUT if re.fullmatch(pattern, path)), None)
        if expected is None:
            raise LegoError(f"unknown layer {path} ({layer.kind}) in the network: not a LEGO layout this reads")
        if layer.kind != expected:
            raise LegoError(f"layer {path or 'the network'} is a {layer.kind}, expected {expected}")
        _check_settings(layer)


def _check_settings(layer: Layer) -> None:
    """The per-layer settings this project's model reproduces; anything else is refused."""
    a, where = layer.attrs, layer.path
    if layer.kind == "LayerNorm" and (a.get("eps") != 1e-6 or a.get("elementwise_affine") or layer.tensors):
        raise LegoError(
            f"{where}: LayerNorm eps {a.get('eps')}, affine {a.get('elementwise_affine')}: expected 1e-06, none"
        )
    if layer.kind == "GELU" and a.get("approximate") != "tanh":
        raise LegoError(f"{where}: GELU approximate={a.get('approximate')!r}, expected 'tanh'")
    if layer.kind == "Attention":
        qkv, heads = layer.children.get("qkv"), a.get("num_heads")
        head = a.get("head_dim") or (qkv.tensors["weight"].shape[1] // heads if qkv and isinstance(heads, int) else 0)
        scale = a.get("scale", head**-0.5 if head else None)
        if not head or not isinstance(scale, float) or not math.isclose(scale, head**-0.5, rel_tol=1e-6):
            raise LegoError(f"{where}: attention scale {scale} is not 1/sqrt(head width {head})")
        if a.get("gate") is not None:
            raise LegoError(f"{where}: gated attention is not supported")
    if layer.kind == "Conv2d":
        kernel = tuple(a.get("kernel_size", ()))
        patchify = tuple(a.get("stride", ())) == kernel and tuple(a.get("padding", (0, 0))) == (0, 0)
        if not patchify or tuple(a.get("dilation", (1, 1))) != (1, 1) or a.get("groups", 1) != 1:
            raise LegoError(f"{where}: the patch embedding is not a plain patchify convolution")
    if layer.kind == "PositionalEmbedding":
        if a.get("max_positions") != 10000 or a.get("endpoint"):
            raise LegoError(f"{where}: timestep frequencies (max {a.get('max_positions')}) differ from 1/10000^(i/n)")
    if layer.kind == "LEGO_module" and a.get("learn_sigma"):
        raise LegoError(f"{where}: learn_sigma=True (the brick also predicts a variance) is not supported")
    if layer.kind == "LEGO" and a.get("map_augment") is not None:
        raise LegoError("the network conditions on augmentation labels (augment_dim > 0): not supported")


# -- the config ------------------------------------------------------------------------------------


def infer_config(layers: dict[str, Layer], loss_attrs: dict) -> LegoConfig:
    """The LegoConfig of the network, from its attributes and weight shapes alone."""
    net, lego = layers[""].attrs, _layer(layers, "model").attrs
    sizes = lego.get("img_resolution")
    count = len(_layer(layers, "model.model").children)
    if not (isinstance(sizes, list | tuple) and len(sizes) == count > 0 and all(isinstance(r, int) for r in sizes)):
        raise LegoError(f"the network lists brick sizes {sizes!r} for {count} bricks")
    widths = {_weight(layers, f"model.model.{k}.x_embedder.proj").shape[0] for k in range(count)}
    if len(widths) != 1:
        raise LegoError(f"bricks have different widths {sorted(widths)}: the shared conditioning needs one")
    bricks = tuple(_brick_config(layers, k, sizes[k]) for k in range(count))
    channels, resolution, classes = net.get("img_channels"), net.get("img_resolution"), net.get("label_dim") or 0
    if not all(isinstance(v, int) and v >= 0 for v in (channels, resolution, classes)):
        raise LegoError(f"unreadable channels / resolution / label count: {channels!r}, {resolution!r}, {classes!r}")
    labels = layers.get("model.y_embedder")
    if bool(classes) != (labels is not None):
        raise LegoError(f"the network has {classes} classes but {'a' if labels else 'no'} label embedding")
    return LegoConfig(
        bricks=bricks,
        img_channels=channels,
        img_resolution=resolution,
        num_classes=classes,
        cond_dim=bricks[0].width,
        edm=_edm_config(net, loss_attrs),
        label_dropout=float(labels.attrs.get("dropout_prob", 0.1)) if labels else 0.1,
        label_bias=bool(labels and "bias" in labels.children["embedding_table"].tensors),
        name=str(layers[""].attrs["init_kwargs"].get("model_type") or "official-lego"),
    )


def _brick_config(layers: dict[str, Layer], k: int, size: int) -> BrickConfig:
    brick = f"model.model.{k}"
    weight = _weight(layers, f"{brick}.x_embedder.proj")
    if weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
        raise LegoError(f"{brick}: the patch embedding weight {tuple(weight.shape)} is not (width, C, p, p)")
    width, patch = weight.shape[0], weight.shape[2]
    blocks = _layer(layers, f"{brick}.blocks").children
    if not blocks or sorted(blocks) != sorted(str(j) for j in range(len(blocks))):
        raise LegoError(f"{brick}: blocks are missing or not numbered 0..n-1")
    heads = _layer(layers, f"{brick}.blocks.0.attn").attrs.get("num_heads")
    hidden = _weight(layers, f"{brick}.blocks.0.mlp.fc1").shape[0]
    if not isinstance(heads, int) or heads < 1:
        raise LegoError(f"{brick}: unreadable head count {heads!r}")
    halves = _pos_halves(layers, brick, width, size // patch if size % patch == 0 else 0)
    cfg = BrickConfig(size, patch, len(blocks), width, heads, mlp_ratio=hidden / width, pos_halves=halves)
    if int(width * cfg.mlp_ratio) != hidden:
        raise LegoError(f"{brick}: MLP width {hidden} is not a ratio of the width {width}")
    for j in range(len(blocks)):
        if _layer(layers, f"{brick}.blocks.{j}.attn").attrs.get("num_heads") != heads:
            raise LegoError(f"{brick}: blocks have different head counts")
    return cfg


def _pos_halves(layers: dict[str, Layer], brick: str, width: int, grid: int) -> str:
    """Which half of the stored (fixed, not learned) position embedding embeds the row: the
    authors' code puts the column first; any other embedding is refused."""
    stored = _layer(layers, brick).tensors.get("pos_embed")
    if stored is None or grid < 1 or width % 4 or stored.numel() != grid * grid * width:
        raise LegoError(f"{brick}: the file has no position embedding of {grid * grid} tokens x {width}")
    stored = stored.reshape(grid * grid, width).float()
    for halves in ("col-row", "row-col"):
        if (stored - sincos_position_embedding(width, grid, halves)).abs().max().item() <= 1e-5:
            return halves
    raise LegoError(f"{brick}: the stored position embedding is not the fixed 2-D sin-cos one")


def _layer(layers: dict[str, Layer], path: str) -> Layer:
    if path not in layers:
        raise LegoError(f"the network has no layer {path}")
    return layers[path]


def _weight(layers: dict[str, Layer], path: str) -> Tensor:
    weight = _layer(layers, path).tensors.get("weight")
    if weight is None:
        raise LegoError(f"the network has no weight {path}.weight")
    return weight


def _edm_config(net: dict, loss_attrs: dict) -> EDMConfig:
    """sigma_data from the network; the schedule as the authors' sampler clamps it; the training
    distribution from the loss, where the file has one."""
    sigma_min = max(SCHEDULE_SIGMA_MIN, _number(net.get("sigma_min"), 0.0))
    sigma_max = min(SCHEDULE_SIGMA_MAX, _number(net.get("sigma_max"), math.inf))
    defaults = EDMConfig()
    return EDMConfig(
        sigma_data=_number(net.get("sigma_data"), defaults.sigma_data),
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        p_mean=_number(loss_attrs.get("P_mean"), defaults.p_mean),
        p_std=_number(loss_attrs.get("P_std"), defaults.p_std),
    )


def _number(value, default: float) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


# -- the weights -----------------------------------------------------------------------------------

# Their state-dict names -> ours (first full match wins).
_NAMES: list[tuple[str, str]] = [
    (r"model\.t_embedder\.mlp\.([02])\.(weight|bias)", r"embedder.noise_mlp.\1.\2"),
    (r"model\.y_embedder\.embedding_table\.(weight|bias)", r"embedder.label_embed.\1"),
    (r"model\.model\.(\d+)\.x_embedder\.proj\.(weight|bias)", r"bricks.\1.patch_embed.\2"),
    (r"model\.model\.(\d+)\.blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"bricks.\1.blocks.\2.attn.\3.\4"),
    (r"model\.model\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"bricks.\1.blocks.\2.mlp.0.\3"),
    (r"model\.model\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"bricks.\1.blocks.\2.mlp.2.\3"),
    (r"model\.model\.(\d+)\.blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)", r"bricks.\1.blocks.\2.ada_ln.1.\3"),
    (r"model\.model\.(\d+)\.final_layer\.linear\.(weight|bias)", r"bricks.\1.final.linear.\2"),
    (r"model\.model\.(\d+)\.final_layer\.adaLN_modulation\.1\.(weight|bias)", r"bricks.\1.final.ada_ln.1.\2"),
]
_POS_EMBED = re.compile(r"model\.model\.(\d+)\.pos_embed")


def their_state(layers: dict[str, Layer]) -> dict[str, Tensor]:
    """The network's state dict under the authors' names."""
    return {_join(path, name): t for path, layer in layers.items() for name, t in layer.tensors.items()}


def map_weights(theirs: dict[str, Tensor], model: LegoModel) -> dict[str, Tensor]:
    """A state dict for model from the authors' tensors; refuses anything missing, extra or misshapen."""
    ours = model.state_dict()
    mapped: dict[str, Tensor] = {}
    for name, tensor in theirs.items():
        if _POS_EMBED.fullmatch(name):
            continue  # fixed, not learned: the config's pos_halves computes it (see _pos_halves)
        target = _our_name(name)
        if target not in ours:
            raise LegoError(f"weight {name} has no place in the inferred model (config: {model.cfg.name})")
        if target.endswith("patch_embed.weight"):
            tensor = _swap_coordinate_channels(tensor)
        if tuple(tensor.shape) != tuple(ours[target].shape):
            raise LegoError(
                f"weight {name} has shape {tuple(tensor.shape)}, the inferred config needs {tuple(ours[target].shape)}"
            )
        mapped[target] = tensor.to(torch.float32)
    missing = sorted(set(ours) - set(mapped))
    if missing:
        raise LegoError(f"the file has no weight for {missing[0]} ({len(missing)} missing in all)")
    return mapped


def _our_name(name: str) -> str | None:
    for pattern, replacement in _NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


def _swap_coordinate_channels(weight: Tensor) -> Tensor:
    """Their two coordinate inputs are (row, column), ours (column, row): swap the last two input
    channels of the patch embedding, which gives the same output for the same pixels."""
    order = list(range(weight.shape[1] - 2)) + [weight.shape[1] - 1, weight.shape[1] - 2]
    return weight[:, order]


# -- all together ----------------------------------------------------------------------------------


@dataclass
class Imported:
    model: LegoModel
    intermediate_trained: bool  # trained with a loss on every brick's estimate (skipping is meaningful)
    entry: str


def import_network(path: str | Path, entry: str = "ema") -> Imported:
    """The network of a snapshot as a LegoModel in eval mode, with every weight mapped and checked."""
    root, loss_attrs = read_network(path, entry)
    layers = flatten(root)
    check_layout(layers)
    cfg = infer_config(layers, loss_attrs)
    model = LegoModel(cfg)
    theirs = their_state(layers)
    model.load_state_dict(map_weights(theirs, model), strict=True)
    intermediate = bool(layers["model"].attrs.get("train_intermediate_stages"))
    return Imported(model.eval(), intermediate, entry)


def describe(imported: Imported) -> str:
    """The imported config in one line."""
    cfg = imported.model.cfg
    bricks = " | ".join(f"r{b.size}/p{b.patch}/d{b.depth}" for b in cfg.bricks)
    b0 = cfg.bricks[0]
    labels = f"{cfg.num_classes} classes (null label = bias)" if cfg.num_classes else "unconditional"
    trained = "every brick's estimate trained" if imported.intermediate_trained else "only the last brick trained"
    return (
        f"{imported.entry}: {cfg.name}, bricks {bricks}, width {b0.width}, {b0.heads} heads, mlp ratio "
        f"{b0.mlp_ratio:g}, {cfg.img_channels} channels at {cfg.img_resolution}x{cfg.img_resolution}, {labels}, "
        f"sigma_data {cfg.edm.sigma_data:g}, schedule sigma {cfg.edm.sigma_min:g}..{cfg.edm.sigma_max:g}, "
        f"{trained}, {imported.model.num_parameters():,} parameters"
    )


def import_checkpoint(path: str | Path, out: str | Path, entry: str = "ema") -> str:
    """Convert a snapshot's network into a LEGO .safetensors checkpoint (written atomically); returns
    the one-line description of what was imported."""
    from lego_export.checkpoint import save_checkpoint

    imported = import_network(path, entry)
    extra = {"imported_from": Path(path).name, "source_sha256": _sha256(path), "entry": entry}
    save_checkpoint(out, imported.model, extra=extra)
    return f"{Path(path).name} {describe(imported)}"


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
