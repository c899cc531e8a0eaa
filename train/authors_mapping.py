"""The authors' DiffIML weights (their IMDLBenCo code, github scu-zjz/DiffIML) in our names and config.

Their state dict has three parts: ``extractor.`` (their own MiT, stages numbered from 1, and the Segformer-style
head), ``unet.unet.`` (a diffusers ``UNet2DModel``) beside ``unet.concat`` (the entry conv over
``concat(conv_in(z), condition)``), and ``vae.`` (the LightVAE as two ``nn.Sequential``). Three tensors change shape:
- ``attn.kv`` holds K and V stacked, [2C, C]: rows [:C] are our key, rows [C:] our value;
- ``unet.concat`` reads [latent (C) | condition (head)] input channels: split along dim 1 into our two entries;
- the mid-block attention's ``to_q``, ``to_k``, ``to_v`` stack, in that order, into our fused ``qkv``.

The architecture is read from the shapes; what our config cannot express is refused, by name. Their UNet keeps
diffusers' defaults (GroupNorm 32, 8-wide heads) and their MiT variants transformers' heads and reductions: the
weights cannot show those, and the authors' code cannot change them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from diffiml.constants import LATENT_CHANNELS
from diffiml.train.checkpoint import CheckpointError
from diffiml.train.config import MIT_LAYER_NORM_EPS, MIT_VARIANTS, ModelConfig, get_config

AUTHORS_IMAGE_SIZE = 512  # their condition encoder resizes to a fixed 64² latent grid: 512² inputs
REDUCED_STAGES = 3  # sequence reduction ratios [8, 4, 2, 1], theirs and transformers': the last stage has none
WB = ("weight", "bias")
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# Our MiT's names, by transformers layout ({s}: stage from 0, {j}: block): transformers 5 renamed them all.
MIT_LAYOUTS: dict[str, dict[str, str]] = {
    "transformers 5": {
        "patch": "stages.{s}.patch_embeddings", "block": "stages.{s}.blocks.{j}", "stage_norm": "stages.{s}.layer_norm",
        "norm1": "layernorm_before", "norm2": "layernorm_after", "q": "attention.q_proj", "k": "attention.k_proj",
        "v": "attention.v_proj", "proj": "attention.o_proj", "sr": "attention.sequence_reduction.sequence_reduction",
        "sr_norm": "attention.sequence_reduction.layer_norm", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
    },
    "transformers 4": {
        "patch": "encoder.patch_embeddings.{s}", "block": "encoder.block.{s}.{j}",
        "stage_norm": "encoder.layer_norm.{s}", "norm1": "layer_norm_1", "norm2": "layer_norm_2",
        "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
        "proj": "attention.output.dense", "sr": "attention.self.sr", "sr_norm": "attention.self.layer_norm",
        "fc1": "mlp.dense1", "fc2": "mlp.dense2",
    },
}
# diffusers before 0.15 named the mid-block attention's projections differently.
OLD_DIFFUSERS_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class AuthorsCheckpointError(CheckpointError):
    """A file that is not a DiffIML checkpoint of the authors' code, or one our config cannot express."""


@dataclass(frozen=True)
class Rule:
    """Our tensor ``ours`` from theirs: one copied, several stacked along dim 0, or (``piece`` = dim, start, stop)
    a slice of one."""

    ours: str
    theirs: tuple[str, ...]
    piece: tuple[int, int, int] | None = None

    def make(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.piece is not None:
            dim, start, stop = self.piece
            return state[self.theirs[0]].narrow(dim, start, stop - start).clone()  # no storage shared with its twin
        if len(self.theirs) > 1:
            return torch.cat([state[t] for t in self.theirs], dim=0)
        return state[self.theirs[0]]


def names(keys: Any, limit: int = 4) -> str:
    """Sorted names for a one-line message: the first ``limit`` and a count of the rest."""
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def normalize(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops DDP's ``module.`` prefix and renames old diffusers' attention projections to today's."""
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    old = re.compile(r"(unet\.unet\.mid_block\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
    return {old.sub(lambda m: m[1] + OLD_DIFFUSERS_ATTENTION[m[2]] + ".", k): v for k, v in state.items()}


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise AuthorsCheckpointError(f"missing {key}: not a DiffIML checkpoint of the authors' code")
    return tuple(state[key].shape)


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> dict[int, int]:
    """Stage or block index (group 1) -> number of distinct sub-indices (group 2) among the keys."""
    found: dict[int, set[int]] = {}
    for key in state:
        if m := re.fullmatch(pattern, key):
            found.setdefault(int(m[1]), set()).add(int(m[2]))
    return {k: len(v) for k, v in found.items()}


def _mit_variant(state: Mapping[str, torch.Tensor]) -> str:
    if not any(k.startswith("extractor.") for k in state):
        raise AuthorsCheckpointError("no extractor.* weights: not a DiffIML checkpoint of the authors' code")
    if "extractor.backbone.patch_embed1.proj.weight" not in state:
        raise AuthorsCheckpointError("its backbone is not a MiT (Segformer): our config has no equivalent of it")
    widths = [_shape(state, f"extractor.backbone.patch_embed{s}.proj.weight")[0] for s in range(1, 5)]
    blocks = _count(state, r"extractor\.backbone\.block(\d+)\.(\d+)\..+")
    depths = [blocks.get(s, 0) for s in range(1, 5)]
    for variant, shape in MIT_VARIANTS.items():
        if shape["hidden_sizes"] == widths and shape["depths"] == depths and len(blocks) == 4:
            return variant
    raise AuthorsCheckpointError(f"its MiT (widths {widths}, blocks {depths}) is none of our variants "
                                 f"{sorted(MIT_VARIANTS)}")


def _check_options(args: Mapping[str, Any], variant: str) -> list[str]:
    """Refuses the run options (IMDLBenCo's saved args, where present) our config cannot express; returns what
    had to be assumed because the checkpoint does not record it."""
    if args.get("model") not in (None, "DiffIML"):
        raise AuthorsCheckpointError(f"a {args['model']} run, not DiffIML")
    if args.get("backbone") not in (None, f"segformer_{variant}"):
        raise AuthorsCheckpointError(f"its args name backbone {args['backbone']} but its weights are MiT-{variant}")
    if str(args.get("norm_layer_type", "BatchNorm")) != "BatchNorm":
        raise AuthorsCheckpointError(f"its LightVAE uses {args['norm_layer_type']}: ours uses BatchNorm")
    activation = args.get("activation_fn_name")
    if activation is not None and str(activation).lower() != "relu":
        raise AuthorsCheckpointError(f"its LightVAE uses {activation} activations: ours uses ReLU")
    return [] if activation else ["LightVAE activation: ReLU (the authors' default; the checkpoint does not record it)"]


def authors_config(state: Mapping[str, torch.Tensor], args: Mapping[str, Any] | None = None
                   ) -> tuple[ModelConfig, list[str]]:
    """Our config for their (normalized) state dict and saved args, and the assumptions it rests on."""
    args = args or {}
    variant = _mit_variant(state)
    assumed = _check_options(args, variant)
    if "vae.encoder.1.running_mean" not in state and "vae.encoder.1.weight" in state:
        raise AuthorsCheckpointError("its LightVAE uses GroupNorm (no BatchNorm statistics): ours uses BatchNorm")
    latent_in = _shape(state, "unet.unet.conv_in.weight")[1]
    vae_latent = _shape(state, "vae.encoder.9.weight")[0]
    if latent_in != 2 * LATENT_CHANNELS or vae_latent != LATENT_CHANNELS:
        raise AuthorsCheckpointError(f"its LightVAE latents have {vae_latent} channels and its UNet reads {latent_in}: "
                                     f"ours have {LATENT_CHANNELS} per map, mask and edge")
    if any(re.match(r"unet\.unet\.(down|up)_blocks\.[1-9]", k) for k in state):
        raise AuthorsCheckpointError("its UNet has more than one resolution level: ours has one")
    base = _shape(state, "vae.encoder.0.weight")[0]
    image_size = args.get("image_size", AUTHORS_IMAGE_SIZE)
    try:
        config = ModelConfig(
            name="authors", image_size=int(image_size), backbone=variant,
            head_channels=_shape(state, "extractor.linear_c1.weight")[0],
            unet_channels=_shape(state, "unet.unet.conv_in.weight")[0],
            unet_layers_per_block=_count(state, r"unet\.unet\.down_blocks\.(\d+)\.resnets\.(\d+)\..+").get(0, 0),
            unet_head_dim=8, unet_groups=32,  # diffusers' UNet2DModel defaults, which the authors' Unet keeps
            time_embed_dim=_shape(state, "unet.unet.time_embedding.linear_1.weight")[0],
            vae_channels=[base, 2 * base, 4 * base], self_correlation=False, mit_layer_norm_eps=MIT_LAYER_NORM_EPS)
    except (TypeError, ValueError) as exc:
        raise AuthorsCheckpointError(f"its options do not make one of our configs: {exc}") from None
    if dataclasses.replace(config, name="paper") == get_config("paper"):
        config.name = "paper"
    return config, assumed


def mit_layout(our_keys: Any) -> dict[str, str]:
    """The MiT names of the transformers installed here, told by our model's own keys."""
    for layout in MIT_LAYOUTS.values():
        if f"encoder.backbone.{layout['patch'].format(s=0)}.proj.weight" in our_keys:
            return layout
    raise AuthorsCheckpointError("this transformers names the MiT's weights in a way the importer does not know")


def _copy(rules: list[Rule], ours: str, theirs: str, suffixes: tuple[str, ...] = WB) -> None:
    rules.extend(Rule(f"{ours}.{x}", (f"{theirs}.{x}",)) for x in suffixes)


def mit_rules(config: ModelConfig, layout: dict[str, str]) -> list[Rule]:
    """The backbone's tensors, in one transformers ``layout`` (a value of ``MIT_LAYOUTS``)."""
    rules: list[Rule] = []
    mine, theirs = "encoder.backbone.", "extractor.backbone."
    shape = MIT_VARIANTS[config.backbone]
    for s, (width, depth) in enumerate(zip(shape["hidden_sizes"], shape["depths"], strict=True)):
        patch = mine + layout["patch"].format(s=s)
        _copy(rules, f"{patch}.proj", f"{theirs}patch_embed{s + 1}.proj")
        _copy(rules, f"{patch}.layer_norm", f"{theirs}patch_embed{s + 1}.norm")
        parts = [("norm1", "norm1"), ("norm2", "norm2"), ("q", "attn.q"), ("proj", "attn.proj"), ("fc1", "mlp.fc1"),
                 ("fc2", "mlp.fc2"), *([("sr", "attn.sr"), ("sr_norm", "attn.norm")] if s < REDUCED_STAGES else [])]
        for j in range(depth):
            ours, t = mine + layout["block"].format(s=s, j=j), f"{theirs}block{s + 1}.{j}"
            for part, their_part in parts:
                _copy(rules, f"{ours}.{layout[part]}", f"{t}.{their_part}")
            _copy(rules, f"{ours}.mlp.dwconv.dwconv", f"{t}.mlp.dwconv.dwconv")
            for x in WB:
                rules.append(Rule(f"{ours}.{layout['k']}.{x}", (f"{t}.attn.kv.{x}",), (0, 0, width)))
                rules.append(Rule(f"{ours}.{layout['v']}.{x}", (f"{t}.attn.kv.{x}",), (0, width, 2 * width)))
        _copy(rules, mine + layout["stage_norm"].format(s=s), f"{theirs}norm{s + 1}")
    return rules


def _resnet(rules: list[Rule], ours: str, theirs: str, shortcut: bool) -> None:
    for mine, their in (("norm1", "norm1"), ("conv1", "conv1"), ("time_proj", "time_emb_proj"), ("norm2", "norm2"),
                        ("conv2", "conv2"), *((("skip", "conv_shortcut"),) if shortcut else ())):
        _copy(rules, f"{ours}.{mine}", f"{theirs}.{their}")


def _unet_rules(rules: list[Rule], config: ModelConfig) -> None:
    u, c = "unet.unet.", config.unet_channels
    _copy(rules, "unet.time_mlp.0", u + "time_embedding.linear_1")
    _copy(rules, "unet.time_mlp.2", u + "time_embedding.linear_2")
    _copy(rules, "unet.conv_in", u + "conv_in")
    rules.append(Rule("unet.latent_entry.weight", ("unet.concat.weight",), (1, 0, c)))
    rules.append(Rule("unet.condition_entry.weight", ("unet.concat.weight",), (1, c, c + config.head_channels)))
    for i in range(config.unet_layers_per_block):
        _resnet(rules, f"unet.down.{i}", f"{u}down_blocks.0.resnets.{i}", shortcut=False)
    _resnet(rules, "unet.mid1", u + "mid_block.resnets.0", shortcut=False)
    _resnet(rules, "unet.mid2", u + "mid_block.resnets.1", shortcut=False)
    attn = u + "mid_block.attentions.0"
    _copy(rules, "unet.mid_attn.norm", f"{attn}.group_norm")
    rules.extend(Rule(f"unet.mid_attn.qkv.{x}", tuple(f"{attn}.to_{p}.{x}" for p in "qkv")) for x in WB)
    _copy(rules, "unet.mid_attn.out", f"{attn}.to_out.0")
    for i in range(config.unet_layers_per_block + 1):
        _resnet(rules, f"unet.up.{i}", f"{u}up_blocks.0.resnets.{i}", shortcut=True)
    _copy(rules, "unet.norm_out", u + "conv_norm_out")
    _copy(rules, "unet.conv_out", u + "conv_out")


def _vae_rules(rules: list[Rule]) -> None:
    """Their Sequentials are flat (conv, norm, act, ...); ours group each stage: index arithmetic."""
    for k in range(3):
        _copy(rules, f"vae.encoder.{k}.0", f"vae.encoder.{3 * k}", ("weight",))
        _copy(rules, f"vae.encoder.{k}.1", f"vae.encoder.{3 * k + 1}", BN)
        _copy(rules, f"vae.decoder.{k + 1}.0", f"vae.decoder.{3 * k + 1}", BN)
        _copy(rules, f"vae.decoder.{k + 1}.2", f"vae.decoder.{3 * k + 3}", ("weight",))
    _copy(rules, "vae.encoder.3", "vae.encoder.9")
    _copy(rules, "vae.decoder.0", "vae.decoder.0")
    _copy(rules, "vae.decoder.4", "vae.decoder.10", BN)
    _copy(rules, "vae.decoder.6", "vae.decoder.12")


def mapping_rules(config: ModelConfig, our_keys: Any) -> list[Rule]:
    """Every tensor of our model for ``config`` (whose state-dict keys are ``our_keys``) from theirs."""
    rules = mit_rules(config, mit_layout(our_keys))
    for s in range(4):
        _copy(rules, f"encoder.stage_proj.{s}", f"extractor.linear_c{s + 1}")
    _copy(rules, "encoder.fuse.0", "extractor.linear_fuse.0", ("weight",))
    _copy(rules, "encoder.fuse.1", "extractor.linear_fuse.1", BN)
    _unet_rules(rules, config)
    _vae_rules(rules)
    return rules


def authors_to_ours(state: Mapping[str, torch.Tensor], args: Mapping[str, Any] | None = None
                    ) -> tuple[ModelConfig, dict[str, torch.Tensor], list[str]]:
    """Their state dict (+ saved args) -> our config, our state dict, and the assumptions made. Every one of their
    tensors must be used and every one of ours filled, at our shapes; otherwise nothing is returned."""
    from diffiml.train.model import DiffIML

    state = normalize(state)
    config, assumed = authors_config(state, args)
    try:
        with torch.device("meta"):  # names and shapes only: no memory, no initialization
            reference = {k: tuple(v.shape) for k, v in DiffIML(config).state_dict().items()}
    except ValueError as exc:  # e.g. channels that GroupNorm's 32 groups do not divide
        raise AuthorsCheckpointError(f"its shapes make no model of ours: {exc}") from None
    rules = mapping_rules(config, reference)
    wanted = {t for r in rules for t in r.theirs}
    missing, unknown = wanted - set(state), set(state) - wanted
    if missing or unknown:
        parts = [f"missing {names(missing)}" if missing else "", f"unknown {names(unknown)}" if unknown else ""]
        raise AuthorsCheckpointError("its weights do not fit the authors' DiffIML: " + "; ".join(p for p in parts if p))
    unfilled, extra = set(reference) - {r.ours for r in rules}, {r.ours for r in rules} - set(reference)
    if unfilled or extra:
        raise AuthorsCheckpointError(f"our model here (its transformers) has other weights than the importer fills: "
                                     f"unfilled {names(unfilled)}; unknown {names(extra)}")
    try:
        ours = {r.ours: r.make(state) for r in rules}
    except RuntimeError as exc:  # a slice or a stack of tensors whose shapes do not allow it
        raise AuthorsCheckpointError(f"shapes do not fit our config: {str(exc).splitlines()[0]}") from None
    wrong = [f"{r.ours} {tuple(ours[r.ours].shape)} from {'+'.join(r.theirs)} (need {reference[r.ours]})"
             for r in rules if tuple(ours[r.ours].shape) != reference[r.ours]]
    if wrong:
        raise AuthorsCheckpointError(f"shapes do not fit our config: {names(wrong, 2)}")
    return config, ours, assumed
