"""Union ControlNets: one network, several condition types, told which ones it is given (diffusers'
ControlNetUnionModel, xinsir's ControlNet++ for SDXL).

`build_union_controlnet` copies the UNet's encoder as ControlNetModel.from_unet does, with one control type per
condition column. `union_residuals` runs it the way StableDiffusionXLControlNetUnionPipeline does at sampling:
`controlnet_cond` holds only the conditions given, `control_type_idx` their types and `control_type` the 0/1 vector
of them. A training batch mixes samples that were given different sets of types, so the batch is split into the
groups of samples sharing one set and each group is one such call: a sample is never shown a condition slot it
would not have at sampling (a zero image is not "absent" to this network: its condition embedding and the
attention across slots still read it).
"""

from __future__ import annotations

import torch


def build_union_controlnet(unet, condition_encoder_channels: tuple[int, ...], conditioning_channels: int,
                           num_control_types: int):
    """A fresh ControlNetUnionModel with `num_control_types` types, whose encoder is a copy of `unet`'s and whose
    zero convs output exactly zero.

    diffusers' from_unet keeps the union's own defaults for what the UNet does not say: 6 control types, a
    320-wide control-type transformer and projection (SDXL's first block width), 3 condition channels, and it does
    not copy the add-embedding. Here the types are the run's, the transformer is as wide as the UNet's first block
    (so a narrower UNet works), the condition has --conditioning_channels, and SDXL's add-embedding (pooled text,
    size/crop ids) starts from the UNet's, as ControlNetModel.from_unet does for the plain ControlNet."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetUnionModel

    with init_empty_weights():  # only its config: constructing SDXL's encoder twice would cost seconds and GBs
        template = ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=condition_encoder_channels,
                                                  load_weights_from_unet=False)
    width = unet.config.block_out_channels[0]
    config = {**{k: v for k, v in template.config.items() if not k.startswith("_")},
              "num_control_type": num_control_types, "num_trans_channel": width, "num_proj_channel": width,
              "conditioning_channels": conditioning_channels}
    controlnet = ControlNetUnionModel.from_config(config)
    controlnet.conv_in.load_state_dict(unet.conv_in.state_dict())
    controlnet.time_proj.load_state_dict(unet.time_proj.state_dict())
    controlnet.time_embedding.load_state_dict(unet.time_embedding.state_dict())
    if controlnet.class_embedding:
        controlnet.class_embedding.load_state_dict(unet.class_embedding.state_dict())
    if getattr(controlnet, "add_embedding", None) is not None:
        controlnet.add_embedding.load_state_dict(unet.add_embedding.state_dict())
    controlnet.down_blocks.load_state_dict(unet.down_blocks.state_dict(), strict=False)
    controlnet.mid_block.load_state_dict(unet.mid_block.state_dict(), strict=False)
    return controlnet


def union_types(controlnet) -> int:
    """How many condition types a union ControlNet takes (ControlNetUnionModel's num_control_type, a Flux
    ControlNet-Union's num_mode); 0 for a plain one."""
    config = controlnet.config
    if "num_control_type" in config:
        return config["num_control_type"]
    return config.get("num_mode") or 0


def control_type_vector(types: list[int], num_control_types: int, rows: int, device, dtype) -> torch.Tensor:
    """[rows, num_control_types], 1 at the given types: the pipeline's `control_type`."""
    vector = torch.zeros(rows, num_control_types, device=device, dtype=dtype)
    vector[:, types] = 1
    return vector


def union_residuals(controlnet, noisy_latents, timesteps, encoder_hidden_states, conditions: torch.Tensor,
                    control_types: torch.Tensor, added_cond_kwargs: dict | None = None):
    """(down residuals, mid residual) of a ControlNetUnionModel for a batch whose samples have different types.

    conditions: [B, K, C, H, W], slot k the condition of type k (what a sample was not given is never read);
    control_types: [B, K] bool, on the CPU (the grouping is decided there, without a device sync)."""
    control_types = control_types.cpu().bool()
    num_types = getattr(controlnet, "module", controlnet).config.num_control_type  # DDP wraps it in .module
    groups = torch.unique(control_types, dim=0)
    order, downs, mids = [], [], []
    for group in groups:
        rows = (control_types == group).all(dim=1).nonzero().squeeze(1)
        types = group.nonzero().squeeze(1).tolist()
        on_device = rows.to(noisy_latents.device)
        added = None if added_cond_kwargs is None else {k: v[on_device] for k, v in added_cond_kwargs.items()}
        down, mid = controlnet(
            noisy_latents[on_device],
            timesteps[on_device],
            encoder_hidden_states=encoder_hidden_states[on_device],
            controlnet_cond=[conditions[on_device, k] for k in types],
            control_type=control_type_vector(types, num_types, len(rows), noisy_latents.device, noisy_latents.dtype),
            control_type_idx=types,
            added_cond_kwargs=added,
            return_dict=False,
        )
        order.append(rows)
        downs.append(down)
        mids.append(mid)
    if len(groups) == 1:
        return downs[0], mids[0]
    # back to the batch's order: the groups' rows concatenated, then each sample taken from where it landed
    where = torch.argsort(torch.cat(order)).to(noisy_latents.device)
    down = [torch.cat([d[level] for d in downs])[where] for level in range(len(downs[0]))]
    return down, torch.cat(mids)[where]
