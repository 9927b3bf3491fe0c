"""Gradient checkpointing: the same loss and gradients as without, with LoRA or unfrozen blocks and with the key
bias, and the blocks really run again during backward."""

import pytest
import torch

from avlm.losses import attention_supervision_loss
from avlm.models import ClassificationHead, VideoClassifier, apply_adaptation, build_backbone


def clip(seed=0):
    return torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def make_model(spec, mode, checkpointing, **backbone_kwargs):
    torch.manual_seed(0)
    backbone = build_backbone(spec, init_seed=0, **backbone_kwargs)
    model = VideoClassifier(backbone, ClassificationHead(backbone.feature_dim, 3, hidden_dim=16), masked_layers=[1])
    if mode == "lora":
        apply_adaptation(model, "lora", lora_r=4, lora_dropout=0.0)
    else:
        apply_adaptation(model, "unfreeze", unfreeze_last_n=1)
    if checkpointing:
        model.backbone.enable_gradient_checkpointing()
    return model.train()


def loss_grads_and_mlp_calls(model, token_mask):
    calls = []
    # A pre-hook: checkpoint's recomputation stops as soon as the last saved tensor is back (inside fc2), so a
    # forward hook on the MLP would never see the recomputed call end.
    hooks = [block.mlp.register_forward_pre_hook(lambda *_: calls.append(1)) for block in model.backbone.blocks()]
    try:
        out = model(clip(), backbone_mask=token_mask)
        loss = out.logits.square().mean()
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, len(calls)


@pytest.mark.parametrize(
    "spec, mode, tokens, kwargs, recomputed",
    # LoRA trains both V-JEPA 2 blocks; unfreeze trains timm's last block only (nothing to recompute below it).
    [("vjepa2-tiny", "lora", 32, {}, 2), ("timm-tiny", "unfreeze", 4 * 17, {"frame_tokens": "all"}, 1)],
)
@pytest.mark.parametrize("masked", [False, True])
def test_checkpointing_gives_the_same_loss_and_gradients(spec, mode, tokens, kwargs, recomputed, masked):
    token_mask = None
    if masked:
        token_mask = torch.rand(2, tokens, generator=torch.Generator().manual_seed(3)) > 0.4
    plain_loss, plain_grads, plain_calls = loss_grads_and_mlp_calls(make_model(spec, mode, False, **kwargs), token_mask)
    model = make_model(spec, mode, True, **kwargs)
    loss, grads, calls = loss_grads_and_mlp_calls(model, token_mask)
    assert model.backbone.gradient_checkpointing
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=0, atol=1e-6, msg=name)
    # Two blocks run once each without checkpointing; with it, the trained ones run again during backward.
    assert plain_calls == 2
    assert calls == plain_calls + recomputed


@pytest.mark.parametrize(
    "spec, mode, tokens, kwargs",
    [("vjepa2-tiny", "lora", 32, {}), ("timm-tiny", "unfreeze", 4 * 17, {"frame_tokens": "all"})],
)
@pytest.mark.parametrize("masked", [False, True])
def test_checkpointing_with_supervised_backbone_attention(spec, mode, tokens, kwargs, masked):
    """Attention supervision of a backbone layer: probabilities with their graph, recomputed the same way
    (V-JEPA 2 set to sdpa, so that the forward's switch to eager must be replayed in backward)."""
    token_mask = torch.rand(2, tokens, generator=torch.Generator().manual_seed(3)) > 0.4
    backbone_mask = token_mask if masked else None
    results = []
    for checkpointing in (False, True):
        model = make_model(spec, mode, checkpointing, **kwargs)
        if spec == "vjepa2-tiny":
            model.backbone.base_model().set_attn_implementation("sdpa")
        out = model(clip(), output_attentions=True, backbone_mask=backbone_mask)
        attention = out.backbone_attentions[1]  # timm: (B·T, heads, n, n), so the mask goes per frame too
        rows = attention.shape[0]
        supervision = attention_supervision_loss(
            attention, token_mask.reshape(rows, -1), torch.ones(rows, dtype=torch.bool)
        )
        (out.logits.square().mean() + supervision).backward()
        results.append({name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})
    for name, grad in results[1].items():
        torch.testing.assert_close(grad, results[0][name], rtol=0, atol=1e-6, msg=name)
