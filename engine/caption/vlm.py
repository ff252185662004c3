"""A transformers vision-language model as a captioner, loaded from a local folder only.

One code path for the families `AutoModelForImageTextToText` and `AutoProcessor` load (LLaVA and
JoyCaption, Qwen-VL, BLIP, Florence-2, ...): the prompt goes through the processor's chat template
when it has one, else it is given as is; greedy decoding of at most `max_length` new tokens; the
prompt's tokens are cut from the output where the model repeats them (decoder-only models), and
the caption is made one line (a caption file's first line is the caption).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from loradrop.errors import UserError

from .spec import DEFAULT_VLM_PROMPT, VlmSpec, first_line

# Tried in order: the second is the name older transformers load BLIP-like models with.
_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq")
_FIX = (
    "give --model a folder saved with save_pretrained that AutoModelForImageTextToText and AutoProcessor load"
)


class VlmCaptioner:
    def __init__(self, spec: VlmSpec):
        import torch
        import transformers

        path = spec.model
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json, so it is no transformers model folder; {_FIX}.")
        self.spec = spec
        self.device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError(
                f"--device cuda was asked for but torch sees no GPU here; caption {path} with --device cpu."
            )
        bf16 = self.device == "cuda" and torch.cuda.is_bf16_supported()
        self.dtype = torch.bfloat16 if bf16 else torch.float16 if self.device == "cuda" else torch.float32
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a bad folder
            raise UserError(
                f"{path} has no processor transformers can load ({first_line(e)}); {_FIX}."
            ) from None
        self.model = _load_model(transformers, path, self.dtype).to(self.device).eval()
        self.chat = bool(getattr(self.processor, "chat_template", None))
        prompt = spec.prompt if spec.prompt is not None else (DEFAULT_VLM_PROMPT if self.chat else "")
        self.text = _chat_text(self.processor, prompt) if self.chat and prompt else prompt
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None and not self.model.config.is_encoder_decoder:
            tokenizer.padding_side = "left"  # a batch of prompts must end where generation starts
        self.batch_size = max(1, spec.batch_size)
        self.empty_hint = "the model wrote nothing; try another --prompt"
        self.description = (
            f"{type(self.model).__name__} {path} ({self.device}, {str(self.dtype).removeprefix('torch.')})"
        )

    def caption(self, images: list[Image.Image]) -> list[str]:
        import torch

        kwargs = {"text": [self.text] * len(images), "padding": True} if self.text else {}
        inputs = self.processor(images=images, return_tensors="pt", **kwargs).to(
            self.device, dtype=self.dtype
        )  # casts floats only
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.spec.max_length, do_sample=False)
        prompt_ids = inputs.get("input_ids")
        if (
            prompt_ids is not None
            and out.shape[1] >= prompt_ids.shape[1]
            and torch.equal(out[:, : prompt_ids.shape[1]], prompt_ids)
        ):
            out = out[:, prompt_ids.shape[1] :]
        return [" ".join(text.split()) for text in self.processor.batch_decode(out, skip_special_tokens=True)]


def _load_model(transformers, path: Path, dtype):
    errors = []
    for name in _AUTO_CLASSES:
        auto = getattr(transformers, name, None)
        if auto is None:
            continue
        try:
            return auto.from_pretrained(path, dtype=dtype, local_files_only=True)
        except Exception as e:  # an unknown config class, a missing or corrupt weights file, ...
            errors.append(e)
    raise UserError(f"{path} cannot be loaded as a vision-language model ({first_line(errors[0])}); {_FIX}.")


def _chat_text(processor, prompt: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
