"""The trainable side of a Stable Diffusion pipeline, as one module the core can train.

`DiffusionModel` holds the UNet, the VAE and the text encoder, and its forward pass *is* the
loss: encode images to latents, noise them at a timestep, predict with the UNet, compare with
the scheduler's target (the noise for epsilon-prediction, the velocity for v-prediction).
Keeping the whole objective inside `forward` is what lets accelerate's DDP wrapper, autocast
and a peft wrapper around this module all see one ordinary forward call.

This module imports torch and diffusers; the task imports it only when it builds a model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from finetune.errors import FinetuneError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def load_pipeline(source: str, revision: str | None, eval_timesteps: list[int], dtype=None):
    """The Stable Diffusion pipeline at `source`, in `dtype` (None: float32), and a DDPM scheduler of its
    training noise; a model this task cannot train, or eval timesteps outside its schedule, are refused
    naming the recipe key. diffusers loads the weights straight into place (low_cpu_mem_usage)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    try:
        pipeline = StableDiffusionPipeline.from_pretrained(source, revision=revision, safety_checker=None,
                                                           requires_safety_checker=False, torch_dtype=dtype)
    except Exception as exc:
        raise FinetuneError(
            f"model.name: diffusers could not load a Stable Diffusion pipeline from '{source}': {type(exc).__name__}: "
            f"{exc}. Name a Stable Diffusion 1.x/2.x repo (stable-diffusion-v1-5/stable-diffusion-v1-5) or a folder "
            "written by its save_pretrained (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."
        ) from None
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise FinetuneError(
            f"model.name: the scheduler of '{source}' predicts '{prediction_type}'; this task trains "
            f"{' or '.join(PREDICTION_TYPES)} models."
        )
    steps = noise_scheduler.config.num_train_timesteps
    too_late = [t for t in eval_timesteps if not 0 <= t < steps]
    if too_late:
        raise FinetuneError(f"task.options.eval_timesteps: {too_late} lie outside this scheduler's timesteps 0..{steps - 1}.")
    return pipeline, noise_scheduler


def skeleton_components(source: str, revision: str | None):
    """(unet, vae, text_encoder, DDPM scheduler) of the pipeline at `source`, built from their configs on the meta
    device: no weight is read. The configs' failure names model.name."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    where = {"revision": revision}
    try:
        unet_config = UNet2DConditionModel.load_config(source, subfolder="unet", **where)
        vae_config = AutoencoderKL.load_config(source, subfolder="vae", **where)
        text_config = CLIPTextConfig.from_pretrained(source, subfolder="text_encoder", **where)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **where)
    except Exception as exc:
        raise FinetuneError(f"model.name: could not read the configs of the pipeline '{source}' (unet/, vae/, "
                            f"text_encoder/, scheduler/): {type(exc).__name__}: {exc}") from None
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(text_config)
    return unet, vae, text_encoder, noise_scheduler


class DiffusionModel(torch.nn.Module):
    def __init__(self, unet, vae, text_encoder, noise_scheduler, snr_gamma: float | None = None):
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.noise_scheduler = noise_scheduler  # DDPM: the forward (noising) process of training
        self.snr_gamma = snr_gamma

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def forward(self, input_ids, pixel_values=None, latent_parameters=None, noise_seed=None, timesteps=None):
        """Per-example loss. Training (no `noise_seed`): a random timestep and noise per example and
        a sampled latent, Min-SNR weighted when `snr_gamma` is set. Evaluation: the latent's mean,
        noise drawn from each example's own `noise_seed`, the plain MSE averaged over the fixed
        `timesteps`, so that two runs (or two checkpoints) are measured on exactly the same problem."""
        fixed = noise_seed is not None
        with torch.no_grad():
            if latent_parameters is None:
                latent_parameters = self.vae.encode(pixel_values).latent_dist.parameters
            distribution = DiagonalGaussianDistribution(latent_parameters)
            # fp32 from here to the UNet: under autocast the VAE hands back half precision, in which add_noise
            # rounds ᾱ_t to 1 for small t (no noise at all) and the validation loss would depend on the precision.
            latents = (distribution.mode() if fixed else distribution.sample()).float() * self.vae.config.scaling_factor
        hidden = self.text_encoder(input_ids, return_dict=False)[0]  # grads only when the encoder trains
        if not fixed:
            noise = torch.randn_like(latents)
            steps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),), device=latents.device)
            return self._loss(latents, noise, steps, hidden, weighted=True)
        noise = torch.stack(
            [torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(int(seed))) for seed in noise_seed]
        ).to(latents)
        losses = [
            self._loss(latents, noise, torch.full((len(latents),), step, device=latents.device), hidden, weighted=False)
            for step in timesteps
        ]
        return torch.stack(losses).mean(dim=0)

    def _loss(self, latents, noise, steps, hidden, *, weighted: bool):
        noisy = self.noise_scheduler.add_noise(latents, noise, steps)
        prediction = self.unet(noisy, steps, hidden, return_dict=False)[0]
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, steps)
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if weighted and self.snr_gamma is not None:
            loss = loss * min_snr_weights(self.noise_scheduler, steps, self.snr_gamma, self.prediction_type)
        return loss


def min_snr_weights(noise_scheduler, steps, gamma: float, prediction_type: str):
    """Min-SNR-γ loss weights (Hang et al. 2023, arXiv:2303.09556): min(SNR, γ) / SNR for epsilon
    targets, min(SNR, γ) / (SNR + 1) for velocity targets, as in diffusers' training scripts."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, steps)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return torch.where(snr > 0, clipped / snr, torch.ones_like(snr))  # the limit at SNR 0 (zero-terminal-SNR schedules)


def diffusion_model_of(model) -> DiffusionModel:
    """The DiffusionModel inside whatever a method made of it (a peft wrapper, or itself)."""
    while not isinstance(model, DiffusionModel):
        if not hasattr(model, "get_base_model"):
            raise TypeError(f"expected a DiffusionModel or a peft model around one, got {type(model).__name__}")
        model = model.get_base_model()
    return model


def lora_layers(peft_model) -> dict[str, tuple[dict, dict]]:
    """The adapter of a peft model around a DiffusionModel, per pipeline component (unet,
    text_encoder): (state dict in diffusers' LoRA format, the LoRA config as adapter metadata)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    config = peft_model.peft_config[peft_model.active_adapter]
    metadata = {
        **config.to_dict(),
        "exclude_modules": None,  # names the frozen components, which a per-component load never sees
        # load_lora_weights leaves the new LoRA layers in training mode: a dropout recorded here would
        # stay active at inference and make every image differ from the run's samples.
        "lora_dropout": 0.0,
        "target_modules": sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules,
    }
    components: dict[str, dict] = {}
    for key, value in get_peft_model_state_dict(peft_model).items():
        component, _, name = key.removeprefix("base_model.model.").partition(".")
        components.setdefault(component, {})[name] = value.detach().cpu().contiguous()
    return {component: (convert_state_dict_to_diffusers(state), metadata) for component, state in components.items()}


def with_lora(model: DiffusionModel, directory, frozen: list[str]):
    """A peft model around `model` holding the LoRA that `save` wrote into `directory` (diffusers' format, its
    config in the file's metadata): what the lora method trained, back as a peft model, ready to merge. `frozen`:
    the components that got no adapter, as in the run."""
    import json
    import re
    from pathlib import Path

    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = Path(directory) / "pytorch_lora_weights.safetensors"
    with safe_open(str(weights), "pt") as file:
        metadata = json.loads(file.metadata()["lora_adapter_metadata"])
    component = "unet" if any(k.startswith("unet.") for k in metadata) else "text_encoder"  # both hold the run's config
    config = {k.partition(".")[2]: v for k, v in metadata.items() if k.startswith(component + ".")}
    fields = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__ and k not in ("peft_type", "task_type")}
    fields["exclude_modules"] = rf"({'|'.join(map(re.escape, frozen))})(\..*)?" if frozen else None
    peft_model = get_peft_model(model, LoraConfig(**fields))
    by_component: dict[str, dict] = {}
    for key, value in load_file(weights).items():
        name, _, rest = key.partition(".")
        by_component.setdefault(name, {})[rest] = value
    state = {}
    for name, part in by_component.items():
        converted = convert_unet_state_dict_to_peft(part) if name == "unet" else convert_state_dict_to_peft(part)
        state.update({f"base_model.model.{name}.{k}": v for k, v in converted.items()})
    loaded = set_peft_model_state_dict(peft_model, state)
    if loaded.unexpected_keys:
        raise ValueError(f"{weights} holds weights this model has no place for: {loaded.unexpected_keys[:3]}")
    return peft_model
