"""How much of the backbone trains: frozen, LoRA, the last N blocks, or staged (frozen, then the last N blocks).

The CVS study (research log, Exp 9-10) found a frozen V-JEPA 2 with an attentive probe a strong baseline, LoRA on
the attention projections the best adaptation, and unfreezing even one block harmful; all four stay available so
the comparison can be rerun. The head always trains. Checkpoints hold only the trainable tensors
(``trainable_state_dict``): the frozen backbone is rebuilt from its spec and seed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from avlm.errors import ConfigError, ModelError
from avlm.models.backbones import VideoBackbone
from avlm.models.classifier import VideoClassifier

ADAPTATION_MODES = ("frozen", "lora", "unfreeze", "staged")

# Parameters that weight decay should not shrink towards zero beyond biases and norms: learned query / class /
# position tokens.
_NO_DECAY_NAMES = ("queries", "cls_token", "pos_embed", "reg_token", "mask_token", "position_embedding")


def _is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def apply_adaptation(
    classifier: VideoClassifier,
    mode: str,
    *,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.1,
    lora_targets: Sequence[str] = ("query", "key", "value"),
    unfreeze_last_n: int = 0,
) -> None:
    """Set which parameters train, in place.

    The whole backbone is frozen first and the head made trainable; then:

    - ``frozen``: nothing else.
    - ``lora``: peft LoRA on ``lora_targets`` inside the encoder blocks; ``classifier.backbone.model`` becomes a
      ``PeftModel`` and only its LoRA A/B matrices train. For timm ViTs, query/key/value all map to the fused
      ``qkv`` projection (``qkv``, ``proj``, ``fc1``, ``fc2`` are accepted too).
    - ``unfreeze``: the last ``unfreeze_last_n`` blocks train.
    - ``staged``: like ``frozen``; stage 2 calls :func:`unfreeze_last_blocks`.

    Args:
        classifier: the model to adapt.
        mode: one of ``ADAPTATION_MODES``.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: dropout on the LoRA branch input.
        lora_targets: projection names, e.g. ``("query", "value")``.
        unfreeze_last_n: blocks to unfreeze in ``unfreeze`` mode (at least 1).

    Raises:
        ConfigError: unknown mode or out-of-range numbers.
        ModelError: LoRA targets that match no module, or LoRA applied twice.
    """
    if mode not in ADAPTATION_MODES:
        raise ConfigError(f"unknown adaptation mode '{mode}': use one of {', '.join(ADAPTATION_MODES)}")
    backbone = classifier.backbone
    backbone.requires_grad_(False)
    classifier.head.requires_grad_(True)

    if mode == "lora":
        _apply_lora(classifier, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets)
    elif mode == "unfreeze":
        if unfreeze_last_n < 1:
            raise ConfigError(f"adaptation mode 'unfreeze' needs unfreeze_last_n >= 1, got {unfreeze_last_n}")
        unfreeze_last_blocks(classifier, unfreeze_last_n)
    # Frozen parts must run deterministically; VideoClassifier re-checks this on every forward.
    classifier.train(classifier.training)


def _apply_lora(classifier: VideoClassifier, *, r: int, alpha: float, dropout: float, targets: Sequence[str]) -> None:
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ConfigError(f"lora_r={r} must be at least 1")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"lora_dropout={dropout} must be in [0, 1)")
    backbone = classifier.backbone
    if _is_peft_model(backbone.model):
        raise ModelError(f"LoRA is already applied to backbone '{backbone.name}'")
    regex = backbone.lora_target_regex(targets)
    names = [name for name, _ in backbone.model.named_modules() if name]
    if not any(re.fullmatch(regex, name) for name in names):
        linear = [name for name, m in backbone.model.named_modules() if isinstance(m, nn.Linear)] or names
        raise ModelError(
            f"LoRA targets {list(targets)} match no module of backbone '{backbone.name}' (pattern {regex!r}); "
            f"some of its modules: {linear[:12]}"
        )
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=regex)
    # get_peft_model (rather than inject_adapter_in_model) so that PeftModel.save_pretrained writes the adapter.
    backbone.model = get_peft_model(backbone.model, config)


def unfreeze_last_blocks(classifier: VideoClassifier, n: int) -> list[nn.Parameter]:
    """Make the last ``n`` backbone blocks trainable.

    Args:
        classifier: the model.
        n: how many blocks, counted from the end; 0 does nothing.

    Returns:
        The parameters that were frozen and now train (to add to the optimizer as a new group).

    Raises:
        ConfigError: ``n`` negative or larger than the number of blocks.
    """
    blocks = classifier.backbone.blocks()
    if not 0 <= n <= len(blocks):
        raise ConfigError(f"unfreeze_last_n={n} must be between 0 and the {len(blocks)} backbone blocks")
    newly_trainable = []
    for block in list(blocks)[len(blocks) - n :]:
        for param in block.parameters():
            if not param.requires_grad:
                param.requires_grad_(True)
                newly_trainable.append(param)
    return newly_trainable


def save_lora_adapter(classifier: VideoClassifier, directory: str | Path) -> bool:
    """Write the LoRA adapter with ``PeftModel.save_pretrained`` (loadable by ``PeftModel.from_pretrained``).

    Args:
        classifier: the model.
        directory: output folder.

    Returns:
        True if an adapter was written, False when no LoRA is applied.
    """
    model = classifier.backbone.model
    if not _is_peft_model(model):
        return False
    model.save_pretrained(str(directory))
    return True


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """Count parameters (shared ones once).

    Args:
        module: any module.

    Returns:
        (trainable, total) element counts.
    """
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters only, as detached CPU clones, keyed by their ``state_dict`` names.

    Args:
        module: any module.

    Returns:
        A state dict small enough to checkpoint every epoch (head + LoRA / unfrozen blocks).
    """
    return {name: p.detach().cpu().clone() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what :func:`trainable_state_dict` saved into a model adapted the same way.

    Args:
        module: the freshly built and adapted model.
        state: name -> tensor.

    Raises:
        ModelError: keys unknown to the model, trainable parameters absent from ``state``, or a shape mismatch.
    """
    own = module.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(name for name, p in module.named_parameters() if p.requires_grad and name not in state)
    if unexpected or missing:
        raise ModelError(
            "checkpoint does not match the model: "
            f"missing keys {missing or 'none'}; unexpected keys {unexpected or 'none'}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ModelError(
                f"checkpoint key '{key}' has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
    module.load_state_dict(state, strict=False)


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    # Norm weights and biases are 1-D; the learned tokens are not, so they are matched by name.
    return param.ndim <= 1 or name.endswith("bias") or any(n in name for n in _NO_DECAY_NAMES)


def parameter_groups(
    model: nn.Module,
    parts: Sequence[tuple[str, nn.Module | Sequence[nn.Parameter] | None, float]],
    *,
    weight_decay: float,
) -> list[dict]:
    """AdamW parameter groups, one pair (decayed, not decayed) per named part of ``model``.

    Parameters are matched to parts by module identity, not by name strings, so a renamed attribute or a peft
    wrapper cannot move a parameter into the wrong group. Biases, norm weights, 1-D tensors and learned tokens (pooler
    queries, cls / position tokens, fusion gates) get no weight decay. Only trainable parameters are included; empty
    groups are left out.

    Args:
        model: the whole model (every trainable parameter of it lands in exactly one group).
        parts: ``(name, module, lr)`` in priority order; ``module=None`` takes everything not in an earlier part,
            and a list of parameters stands for a part that is no single module (a backbone's embeddings).
            E.g. ``[("head", m.head, 1e-3), ("backbone", m.backbone, 1e-4)]``.
        weight_decay: decay of the decayed groups.

    Returns:
        Groups with keys ``name`` (``<part>`` and ``<part>_no_decay``), ``params``, ``lr`` and ``weight_decay``.

    Raises:
        ValueError: a trainable parameter of ``model`` belongs to no part (a bug in the caller's ``parts``).
    """
    owner: dict[int, int] = {}
    for index, (_, module, _) in reversed(list(enumerate(parts))):
        if module is None:
            members = model.parameters()
        else:
            members = module.parameters() if isinstance(module, nn.Module) else module
        for param in members:
            owner[id(param)] = index  # earlier parts win: they are written last
    buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) not in owner:
            raise ValueError(f"trainable parameter '{name}' is in none of the parts {[p[0] for p in parts]}")
        buckets.setdefault((owner[id(param)], _is_no_decay(name, param)), []).append(param)
    groups = []
    for index, (part, _, lr) in enumerate(parts):
        for no_decay in (False, True):
            if params := buckets.get((index, no_decay)):
                groups.append(
                    {
                        "name": f"{part}_no_decay" if no_decay else part,
                        "params": params,
                        "lr": lr,
                        "weight_decay": 0.0 if no_decay else weight_decay,
                    }
                )
    return groups


def layer_decay_parts(
    backbone: VideoBackbone, backbone_lr: float, layer_decay: float, *, name: str = "backbone"
) -> list[tuple[str, nn.Module | list[nn.Parameter], float]]:
    """Layer-wise learning-rate decay (BEiT / MAE) as :func:`parameter_groups` parts of the backbone.

    With ``L`` blocks, block ``i`` (0 = nearest the input) trains at ``backbone_lr · layer_decay ** (L - i)`` and
    the embeddings (:meth:`VideoBackbone.embedding_parameters`) at ``backbone_lr · layer_decay ** (L + 1)``;
    whatever else the backbone holds (its final norm) keeps ``backbone_lr``. So the blocks nearest the input,
    which hold the most general features, move least.

    Args:
        backbone: the (possibly peft-wrapped) backbone; LoRA matrices belong to the block they are injected in.
        backbone_lr: the top learning rate.
        layer_decay: the factor per block, in (0, 1]; 1 gives every part ``backbone_lr``.
        name: prefix of the part names: ``<name>_embeddings``, ``<name>_block_<i>``, ``<name>``.

    Returns:
        ``(part name, module or parameters, lr)`` for the embeddings, each block, then the rest of the backbone.
    """
    blocks = list(backbone.blocks())
    depth = len(blocks)
    parts: list[tuple[str, nn.Module | list[nn.Parameter], float]] = [
        (f"{name}_embeddings", backbone.embedding_parameters(), backbone_lr * layer_decay ** (depth + 1))
    ]
    parts += [(f"{name}_block_{i}", block, backbone_lr * layer_decay ** (depth - i)) for i, block in enumerate(blocks)]
    parts.append((name, backbone, backbone_lr))
    return parts
