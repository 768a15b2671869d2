"""Tiny random-weight models for trying the real-model path offline (never a hub download).

Everything is built from configs with a tokenizer trained in-process, in a few seconds on CPU:

- ``lm``: a Qwen2 causal LM (hidden 64, 2 layers, a 512-token context) with a ChatML template;
- ``vlm``: a LLaVA model (tiny CLIP vision tower + Qwen2 text model) with the real
  ``LlavaProcessor`` (32×32 images, 16 image tokens per image);
- ``sd``: a tiny Stable Diffusion text-to-image pipeline (64×64 in a few steps);
- ``ip2p``: a tiny InstructPix2Pix pipeline (UNet ``in_channels=8``) for edits;
- ``build_qwen2_vl``: a tiny Qwen2-VL (multimodal rotary positions), built on request;
- ``build_sd3`` / ``build_flux``: tiny flow-matching pipelines (for the Flow-GRPO tests).

Their outputs are noise; the plumbing (batching, token ids, log-probs, LoRA, recording) is real.
Build a folder for ``examples/configs/tiny-models.toml`` with ``atelier tiny-models DIR``. The
tests' session fixtures live in ``tests/tiny_models.py``. transformers and diffusers are imported
inside the builders only.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon"]
RELATIONS = ["left of", "right of", "above", "below", "next to"]
WORDS = [
    "one",
    "two",
    "three",
    "four",
    "a",
    "an",
    "the",
    "image",
    "shows",
    "add",
    "remove",
    "make",
    "move",
    "no",
    "further",
    "edit",
    "needed",
    "target",
    "description",
    "is",
    "think",
    "draw",
    "steps",
    "instruction",
    "expect",
    "blueprint",
    "scene",
]
TORCH_THREADS = 1
"""Tiny models run fastest on one thread; OpenMP threads spinning on cores that other processes
share can make every op 100x slower (measured on a busy 2-core machine)."""
IMAGE_SIZE = 32
PATCH_SIZE = 8


@dataclass(frozen=True)
class TinyModels:
    root: Path
    lm: Path
    vlm: Path
    sd: Path
    ip2p: Path


def corpus() -> list[str]:
    lines = []
    for i, colour in enumerate(COLOURS):
        for j, shape in enumerate(SHAPES):
            other = SHAPES[(i + j + 1) % len(SHAPES)]
            rel = RELATIONS[(i * 3 + j) % len(RELATIONS)]
            lines.append(f"two {colour} {shape}s {rel} a {COLOURS[j]} {other}.")
            lines.append(f"<think>The image shows a {colour} {shape}.</think>Add one {other}.")
            lines.append(f'{{"steps": [{{"instruction": "Draw a {shape}.", "expect": "{rel}"}}]}}')
    lines.append(" ".join(WORDS) + " No further edit needed.")
    return lines


def build_tokenizer(
    directory: Path | None = None, texts: list[str] | None = None, vocab_size: int = 400
):
    """A byte-level BPE tokenizer with the ChatML template, trained on ``texts`` (default: the
    built-in corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus() if texts is None else texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    fast.chat_template = CHAT_TEMPLATE
    if directory is not None:
        fast.save_pretrained(directory)
    return fast


def _text_config(tokenizer):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


def _finish_generation_config(model, tokenizer) -> None:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None


def build_lm(directory: Path, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(directory)
    model = Qwen2ForCausalLM(_text_config(tokenizer))
    _finish_generation_config(model, tokenizer)
    model.save_pretrained(directory)
    return directory


def build_role_lm(
    directory: Path,
    texts: list[str],
    *,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 8,
    vocab_size: int = 600,
    seed: int = 0,
) -> Path:
    """A small random-weight Qwen2 LM whose tokenizer is trained on ``texts`` (a role's
    language), to be taught a role by LoRA SFT (``benchmarks/learn_decomposer.py``).

    Initialised with std 1/sqrt(hidden) instead of Qwen2's 0.02: LoRA leaves the (tied)
    embedding and the norms frozen, and with 0.02-scale random embeddings the output logits
    cannot grow past a few units, so no adapter can make the model confident (measured: LoRA
    SFT stalled at a loss of ~3.8 nats/token; with this scale it reached 0.02 in 300 steps)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(directory, texts, vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=hidden**-0.5,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    _finish_generation_config(model, tokenizer)
    model.save_pretrained(directory)
    return directory


def build_vlm(directory: Path, seed: int = 1) -> Path:
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    _finish_generation_config(model, tokenizer)
    model.save_pretrained(directory)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(directory)
    return directory


QWEN_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]
"""Qwen2-VL's vision delimiters and video placeholder (its image placeholder is ``<image>``)."""
QWEN_VL_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ '<image>' }}", "{{ '<|vision_start|><image><|vision_end|>' }}"
)


def build_qwen2_vl(directory: Path, seed: int = 6) -> Path:
    """A tiny Qwen2-VL (2-block vision tower, patch 8 with 2x2 merging, so a 32x32 image is 4
    image tokens at 2-D multimodal rotary positions; a 2-layer text model) with Qwen2-VL's
    image processor. No processor of its own is saved: Qwen2VLProcessor also loads a video
    processor, which needs torchvision; ``load_processor`` (transformers_lm) builds it from the
    saved image processor and tokenizer."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_VL_TOKENS})
    tokenizer.chat_template = QWEN_VL_TEMPLATE
    tokenizer.save_pretrained(directory)
    pixels = IMAGE_SIZE * IMAGE_SIZE  # every image resized to 32x32
    Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=PATCH_SIZE, merge_size=2
    ).save_pretrained(directory)
    text = _text_config(tokenizer).to_dict()
    # Qwen2-VL splits each head's rotary dimensions between time, height and width.
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 1e6,
        "mrope_section": [2, 3, 3],
    }
    token = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=text,
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": text["hidden_size"],
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=token(IMAGE_TOKEN),
        video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    model = Qwen2VLForConditionalGeneration(config)
    _finish_generation_config(model, tokenizer)
    model.save_pretrained(directory)
    return directory


def _clip_config(vocab_size: int, **extra: Any) -> Any:
    """A 2-layer, 32-wide CLIP text encoder config over the tiny CLIP tokenizer's vocabulary."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )


def _vae(**config: Any) -> Any:
    """A two-block (16, 32) VAE; ``config``: latent channels, sample size, ..."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=8,
        **config,
    )


def _flow_vae(*, latent_channels: int, shift_factor: float, scaling_factor: float) -> Any:
    """The VAE of the flow pipelines (SD3, Flux): no quant convs, shifted and scaled latents."""
    return _vae(
        latent_channels=latent_channels,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


def build_clip_tokenizer(directory: Path):
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz.,"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = ["#version: 0.2", "r e</w>", "e d</w>"]
    vocab.setdefault("re</w>", len(vocab))
    vocab.setdefault("ed</w>", len(vocab))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77
    )
    return tokenizer


def _sd_components(directory: Path, in_channels: int, seed: int):
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_clip_tokenizer(Path(scratch))
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = _vae(latent_channels=4, sample_size=64)
    text_encoder = CLIPTextModel(_clip_config(len(tokenizer)))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
    }


def build_sd(directory: Path, seed: int = 2) -> Path:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **_sd_components(directory, 4, seed), requires_safety_checker=False
    )
    pipe.save_pretrained(directory)
    return directory


def build_ip2p(directory: Path, seed: int = 3) -> Path:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline(
        **_sd_components(directory, 8, seed), requires_safety_checker=False
    )
    pipe.save_pretrained(directory)
    return directory


def build_all(root: Path) -> TinyModels:
    """``lm``, ``vlm``, ``sd`` and ``ip2p`` under ``root`` (created; existing ones rebuilt)."""
    root.mkdir(parents=True, exist_ok=True)
    models = TinyModels(root, root / "lm", root / "vlm", root / "sd", root / "ip2p")
    build_lm(models.lm)
    build_vlm(models.vlm)
    build_sd(models.sd)
    build_ip2p(models.ip2p)
    return models


MODEL_PACKAGES = ("torch", "transformers", "diffusers", "tokenizers")


def missing_packages() -> list[str]:
    """The packages the builders need that are not installed (the ``models`` extra)."""
    from importlib.util import find_spec

    return [name for name in MODEL_PACKAGES if find_spec(name) is None]


def quiet_progress_bars() -> None:
    """Silence the save/load progress bars (a command-line build prints its own summary)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


def build_sd3(directory: Path, seed: int = 4) -> Path:
    """A tiny Stable Diffusion 3 pipeline (flow matching): ``SD3Transformer2DModel`` (2 layers,
    hidden 32, patch 2), two tiny CLIP text encoders with projection and no T5 (the pipeline
    then feeds zeros in T5's place), a 16-channel-free 4-channel VAE with scale factor 2, and
    ``FlowMatchEulerDiscreteScheduler``. 32×32 images are 16×16×4 latents, 64 tokens."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_clip_tokenizer(Path(scratch) / "one")
        tokenizer_2 = build_clip_tokenizer(Path(scratch) / "two")
    text_config = _clip_config(len(tokenizer), projection_dim=32)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # the two CLIP hidden states side by side (T5's width)
        caption_projection_dim=32,
        pooled_projection_dim=64,  # the two CLIP pooled outputs concatenated
        out_channels=4,
        pos_embed_max_size=16,
    )
    vae = _flow_vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(directory)
    return directory


def build_t5_tokenizer(directory: Path | None = None):
    """A T5 (Unigram) tokenizer trained in-process on :func:`corpus` — ~200 pieces, ``<pad>`` 0,
    ``</s>`` 1, ``<unk>`` 2 and T5's 100 sentinel tokens, as a real T5 tokenizer lays them out."""
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer().train_new_from_iterator(corpus(), vocab_size=300)
    if directory is not None:
        tokenizer.save_pretrained(directory)
    return tokenizer


def build_flux(directory: Path, seed: int = 5) -> Path:
    """A tiny FLUX.1-dev-shaped pipeline: ``FluxTransformer2DModel`` (1 double + 1 single block,
    2 heads of 16, rope axes 4+6+6, guidance embedding as in the guidance-distilled dev model), a
    16-channel VAE with scale factor 2 (so 32×32 images are 16×16×16 latents, packed 2×2 into 64
    tokens of 64 channels), a tiny CLIP text model (its pooled output) and a tiny T5 encoder with
    an in-process T5 tokenizer, and Flux's resolution-shifted ``FlowMatchEulerDiscreteScheduler``
    (FLUX.1-dev's scheduler config)."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_clip_tokenizer(Path(scratch))
    tokenizer_2 = build_t5_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(len(tokenizer)))
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's T5-XXL
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels × a 2×2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's width
        pooled_projection_dim=32,  # CLIP's pooled width
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    vae = _flow_vae(latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(directory)
    return directory
