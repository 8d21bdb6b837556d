"""The optimizer's weight-decay groups: timm's rule (1-d parameters and `no_weight_decay()` names are exempt)."""

from __future__ import annotations

from finetune.recipe import TrainSection
from finetune.training.optim import build_optimizer


def test_vit_position_embedding_and_class_token_get_no_weight_decay():
    import timm
    from timm.optim import param_groups_weight_decay

    model = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32)
    assert {"pos_embed", "cls_token"} <= model.no_weight_decay()
    optimizer = build_optimizer([{"params": list(model.parameters())}], TrainSection(weight_decay=0.05), model)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert {"pos_embed", "cls_token"} <= exempt and not {"pos_embed", "cls_token"} & decayed

    # The same split as timm's own param_groups_weight_decay.
    reference = param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
    timm_exempt = {names[id(p)] for g in reference if g["weight_decay"] == 0.0 for p in g["params"]}
    assert exempt == timm_exempt and len(exempt) + len(decayed) == len(names)
