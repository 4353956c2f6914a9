"""Model inputs for image questions, through a vision-language model's own processor.

The prompt text goes into the processor's chat template as one user turn holding the
image and the text (with the generation prompt appended), so each model family gets the
image placeholder and turn markers it was trained with. A processor without a chat
template gets ``<image token>\\n<text>``. The processor expands the placeholder into one
token per image feature.
"""

from __future__ import annotations

from typing import Any


def open_image(image: Any) -> Any:
    """A PIL RGB image from a path, encoded bytes ({"bytes": ...}) or a PIL image."""
    from PIL import Image

    if isinstance(image, str):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, dict) and image.get("bytes"):
        import io

        with Image.open(io.BytesIO(image["bytes"])) as opened:
            return opened.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise ValueError(f"cannot open an image from {type(image).__name__}")


def prompt_with_image(processor: Any, text: str, image: bool = True) -> str:
    """The full prompt string for one image (or none) and ``text`` (see module docstring)."""
    if getattr(processor, "chat_template", None):
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
        return processor.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True)
    if not image:
        return text
    token = getattr(processor, "image_token", None)
    if not token:
        raise ValueError("the model's processor has neither a chat template nor an image token")
    return f"{token}\n{text}"


def image_inputs(processor: Any, text: str, image: Any, device: str) -> dict[str, Any]:
    """Processor outputs (input_ids, attention_mask, pixel_values, …) for one question."""
    if processor is None:
        raise ValueError("image questions need a vision-language model and its processor")
    inputs = processor(text=[prompt_with_image(processor, text)], images=[open_image(image)],
                       return_tensors="pt")
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in dict(inputs).items()}


def text_inputs(processor: Any, text: str, device: str) -> dict[str, Any]:
    """Processor outputs for a question without an image (same template, no image turn)."""
    inputs = processor(text=[prompt_with_image(processor, text, image=False)],
                       return_tensors="pt")
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in dict(inputs).items()}
