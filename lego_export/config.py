"""Model configuration: plain dataclasses and one registry of presets.

A LEGO model is a stack of bricks. Brick k cuts the canvas into r_k x r_k tiles
(``size``), embeds each tile with p_k x p_k patches (``patch``) and runs ``depth``
DiT blocks of ``width`` channels over the (r_k / p_k)^2 tokens of one tile.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

from lego_export.edm import EDMConfig
from lego_export.errors import LegoError

POS_HALVES = ("row-col", "col-row")


@dataclass(frozen=True)
class BrickConfig:
    size: int  # tile side r_k, in pixels
    patch: int  # patch side p_k, in pixels
    depth: int  # number of DiT blocks
    width: int  # hidden size of the tokens
    heads: int  # attention heads
    mlp_ratio: float = 4.0
    # Order of the two halves of the 2-D sin-cos position embedding: "row-col" embeds the token's
    # row first (this project's models), "col-row" its column first (the LEGO authors' network).
    pos_halves: str = "row-col"

    @property
    def grid(self) -> int:
        """Tokens per tile side."""
        return self.size // self.patch

    def validate(self) -> None:
        if self.size % self.patch:
            raise LegoError(f"brick size {self.size} is not a multiple of its patch size {self.patch}")
        if self.width % self.heads:
            raise LegoError(f"brick width {self.width} is not a multiple of its head count {self.heads}")
        if self.width % 4:
            raise LegoError(f"brick width {self.width} must be a multiple of 4 (2-D sin-cos position embedding)")
        if min(self.size, self.patch, self.depth, self.width, self.heads) < 1:
            raise LegoError(f"brick {self} has a non-positive field")
        if self.pos_halves not in POS_HALVES:
            raise LegoError(f"brick pos_halves must be one of {', '.join(POS_HALVES)}, got {self.pos_halves!r}")


@dataclass(frozen=True)
class LegoConfig:
    bricks: tuple[BrickConfig, ...]
    img_channels: int = 1
    img_resolution: int = 32  # side of the training canvas
    num_classes: int = 10  # 0 = unconditional
    cond_dim: int = 128  # size of the shared conditioning vector c
    edm: EDMConfig = EDMConfig()
    label_dropout: float = 0.1  # training: share of null labels, which classifier-free guidance needs
    # The label embedding is a Linear over the one-hot; with a bias (the LEGO authors' network) the
    # null label, an all-zero one-hot, embeds to that bias instead of to zero.
    label_bias: bool = False
    name: str = "custom"

    def __post_init__(self) -> None:
        # Accept lists of dicts (as read back from JSON) as well as BrickConfigs.
        bricks = tuple(b if isinstance(b, BrickConfig) else BrickConfig(**b) for b in self.bricks)
        object.__setattr__(self, "bricks", bricks)
        if isinstance(self.edm, dict):
            object.__setattr__(self, "edm", EDMConfig(**self.edm))
        if not bricks:
            raise LegoError("a LEGO model needs at least one brick")
        for b in bricks:
            b.validate()
        self.edm.validate()
        for name, lo, hi in (("img_channels", 1, 64), ("img_resolution", 1, 16_384), ("num_classes", 0, 10_000),
                             ("cond_dim", 1, 65_536)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise LegoError(f"{name} must be an integer from {lo} to {hi}, got {value!r}")
        if not isinstance(self.label_bias, bool):
            raise LegoError(f"label_bias must be true or false, got {self.label_bias!r}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise LegoError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.img_resolution % self.canvas_multiple:
            raise LegoError(
                f"training resolution {self.img_resolution} is not a multiple of the brick sizes "
                f"{[b.size for b in bricks]}"
            )

    @property
    def canvas_multiple(self) -> int:
        """Canvas sides must be multiples of this: every brick tiles the canvas exactly."""
        return math.lcm(*(b.size for b in self.bricks))

    def brick_in_channels(self, k: int) -> int:
        """Input channels of brick k: [F_{k-1}], c_in * x_t and 2 coordinate channels."""
        return (self.img_channels if k > 0 else 0) + self.img_channels + 2

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> LegoConfig:
        """The config from its JSON form; one-line LegoError for anything else."""
        try:
            data = dict(data)
            if "sigma_data" in data:  # written before the EDM constants had their own entry
                data["edm"] = {"sigma_data": data.pop("sigma_data")}
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise LegoError(f"invalid LEGO model config: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> LegoConfig:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise LegoError(f"invalid LEGO model config: {e}") from None
        if not isinstance(data, dict):
            raise LegoError("invalid LEGO model config: not a JSON object")
        return cls.from_dict(data)


# ---------------------------------------------------------------------------------------------
# Presets. Names are "<stack>-<size>": stacks pg (progressive growth: small bricks first),
# pr (progressive refinement: large first), u (U-shape) and dit (one brick over the whole
# canvas, the baseline). Sizes: tiny (tests), s (trainable on a 2-core CPU in hours), and the
# published paper-S/L/XL geometries (DiT widths; brick patches 2 / 8 / 2), for GPU users.


@dataclass(frozen=True)
class _Width:
    width: int
    heads: int
    cond_dim: int


_WIDTHS = {
    "tiny": _Width(32, 2, 32),
    "s": _Width(128, 4, 128),
    "paper-s": _Width(384, 6, 384),
    "paper-l": _Width(1024, 16, 1024),
    "paper-xl": _Width(1152, 16, 1152),
}

# stack -> size -> (brick sizes, patch sizes, depths, training resolution)
_GEOMETRY: dict[str, dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]]] = {
    "pg": {
        "tiny": ((4, 8, 16), (2, 4, 4), (1, 1, 1), 16),
        "s": ((4, 16, 32), (2, 4, 4), (1, 2, 4), 32),
        "paper-s": ((4, 16, 64), (2, 8, 2), (2, 4, 6), 64),
        "paper-l": ((4, 16, 32), (2, 8, 2), (4, 8, 12), 32),
        "paper-xl": ((4, 16, 32), (2, 8, 2), (4, 12, 14), 32),
    },
    "pr": {
        "tiny": ((16, 8, 4), (4, 4, 2), (1, 1, 1), 16),
        "s": ((32, 16, 4), (4, 4, 2), (4, 2, 1), 32),
        "paper-s": ((64, 16, 4), (2, 8, 2), (6, 4, 2), 64),
        "paper-l": ((32, 16, 4), (2, 8, 2), (12, 8, 4), 32),
        "paper-xl": ((32, 16, 4), (2, 8, 2), (14, 12, 4), 32),
    },
    "u": {
        "tiny": ((16, 8, 4, 8, 16), (4, 4, 2, 4, 4), (1, 1, 1, 1, 1), 16),
        "s": ((32, 16, 4, 16, 32), (4, 4, 2, 4, 4), (2, 1, 1, 1, 2), 32),
        "paper-s": ((32, 16, 4, 16, 32), (2, 8, 2, 8, 2), (6, 4, 2, 4, 6), 32),
        "paper-l": ((32, 16, 4, 16, 32), (2, 8, 2, 8, 2), (12, 8, 6, 8, 12), 32),
        "paper-xl": ((32, 16, 4, 16, 32), (2, 8, 2, 8, 2), (14, 10, 4, 10, 14), 32),
    },
    # DiT-S/2, DiT-L/2, DiT-XL/2 (depths 12, 24, 28) as the one-brick baseline.
    "dit": {
        "tiny": ((16,), (4,), (3,), 16),
        "s": ((32,), (4,), (7,), 32),
        "paper-s": ((32,), (2,), (12,), 32),
        "paper-l": ((32,), (2,), (24,), 32),
        "paper-xl": ((32,), (2,), (28,), 32),
    },
}

# Short names users type most.
_ALIASES = {"tiny": "pg-tiny", "s": "pg-s", "pg": "pg-s", "pr": "pr-s", "u": "u-s", "dit": "dit-s"}


# The LEGO authors' model table (the architectures their training script accepts), as
# "<stack>-paper-<s|l|xl>-<32|64>" with aliases spelled like their names ("lego_L_PG_64"). Brick
# sizes follow the training resolution R: PG 4 / 16 / R, PR R / 16 / 4, U R / 16 / 4 / 16 / R, with
# patches 2 / 8 / 2 (U: 2 / 8 / 2 / 8 / 2). These presets also take the authors' network conventions
# (label embedding with a bias, column-first position halves), so a model trained from one has the
# layout of an imported checkpoint of that architecture.
_AUTHORS_DEPTHS: dict[tuple[str, str, int], tuple[int, ...]] = {
    ("pg", "s", 64): (2, 4, 6),
    ("pr", "s", 64): (6, 4, 2),
    ("u", "s", 32): (6, 4, 2, 4, 6),
    ("u", "s", 64): (6, 4, 2, 4, 6),
    ("pg", "l", 32): (4, 8, 12),
    ("pr", "l", 32): (12, 8, 4),
    ("pg", "l", 64): (6, 8, 12),
    ("pr", "l", 64): (12, 8, 6),
    ("u", "l", 32): (12, 8, 6, 8, 12),
    ("u", "l", 64): (12, 8, 6, 8, 12),
    ("pg", "xl", 32): (4, 12, 14),
    ("pr", "xl", 32): (14, 12, 4),
    ("pg", "xl", 64): (4, 12, 14),
    ("pr", "xl", 64): (14, 12, 4),
    ("u", "xl", 32): (14, 10, 4, 10, 14),
    ("u", "xl", 64): (14, 12, 4, 12, 14),
}


def _authors_geometry(stack: str, resolution: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Brick sizes and patches of one of the authors' stacks at a training resolution."""
    if stack == "pg":
        return (4, 16, resolution), (2, 8, 2)
    if stack == "pr":
        return (resolution, 16, 4), (2, 8, 2)
    return (resolution, 16, 4, 16, resolution), (2, 8, 2, 8, 2)


def _preset(name: str, width: _Width, sizes, patches, depths, resolution: int, authors: bool = False) -> LegoConfig:
    halves = "col-row" if authors else "row-col"
    bricks = tuple(
        BrickConfig(size=r, patch=p, depth=d, width=width.width, heads=width.heads, pos_halves=halves)
        for r, p, d in zip(sizes, patches, depths, strict=True)
    )
    return LegoConfig(bricks=bricks, img_resolution=resolution, cond_dim=width.cond_dim, label_bias=authors, name=name)


def _build_presets() -> dict[str, LegoConfig]:
    presets: dict[str, LegoConfig] = {}
    for stack, by_size in _GEOMETRY.items():
        for size, (brick_sizes, patches, depths, resolution) in by_size.items():
            name = f"{stack}-{size}"
            presets[name] = _preset(name, _WIDTHS[size], brick_sizes, patches, depths, resolution)
    for (stack, size, resolution), depths in _AUTHORS_DEPTHS.items():
        name = f"{stack}-paper-{size}-{resolution}"
        brick_sizes, patches = _authors_geometry(stack, resolution)
        presets[name] = _preset(name, _WIDTHS[f"paper-{size}"], brick_sizes, patches, depths, resolution, authors=True)
    return presets


PRESETS: dict[str, LegoConfig] = _build_presets()
_ALIASES.update({f"lego_{size}_{stack}_{res}": f"{stack}-paper-{size}-{res}" for stack, size, res in _AUTHORS_DEPTHS})


def preset_names() -> list[str]:
    return sorted(PRESETS) + sorted(_ALIASES)


def get_preset(name: str, **overrides) -> LegoConfig:
    """Return a preset by name, with fields (channels, resolution, classes...) overridden."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise LegoError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    return replace(PRESETS[key], **overrides)


def valid_class_names(names, num_classes: int) -> bool:
    """One short printable name per class, no two alike (ignoring case), none a plain number."""
    if not isinstance(names, list) or len(names) != num_classes or not names:
        return False
    if not all(isinstance(n, str) and 0 < len(n) <= 64 and n.isprintable() and not n.strip().isdigit() for n in names):
        return False
    return len({n.strip().lower() for n in names}) == len(names)
