"""`VisionLM`: a LLaVA-style model (vision tower + slmkit decoder) as an `LM` that can also look at an image.

Text alone behaves exactly as the decoder's `TorchLM` (log-probs, scoring, generation). With images, a prompt
holds the image token (`<image>`, one per image; `image_prompt` writes LLaVA's "<image>\\n question" turn) and
`stream_ids(..., images=[...])` decodes with the image's embeddings spliced in at its place (model/vit.py).
It is deliberately not a `TorchLM`: the server's batched decoder knows nothing of images, so `slm serve` runs a
vision model one request at a time (engine.py's sequential path), which is what passes the images through.
Only slmkit's torch code runs the vision part; the model directory's decoder alone is what transformers and
llama.cpp can open (formats/vision_dir.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from slmkit.chat import with_chat_stops
from slmkit.data.vision import read_image
from slmkit.lm.base import LM, LogProbs, end_ids
from slmkit.lm.torch_lm import TorchLM, decode, until_end
from slmkit.model.decode import KVCache, prepare_for_decoding
from slmkit.model.vit import VisionTower, splice
from slmkit.sampling import SamplingParams, stream_text


def image_prompt(question: str, image_token: str = "<image>") -> str:
    """A user turn about one image, as LLaVA writes it: the image first, then the question on its own line."""
    return f"{image_token}\n{question}"


class VisionLM(LM):
    accepts_images = True

    def __init__(self, decoder, tower: VisionTower, tokenizer, name: str = "vision", use_cache: bool = True):
        self.text = TorchLM(decoder, tokenizer, name=name, use_cache=use_cache)
        self.model, self.tower = self.text.model, tower.eval()
        self.tokenizer, self.name = tokenizer, name
        self.image_token_id = tower.cfg.image_token_id
        self.image_token = tower.cfg.image_token
        # each image takes n_patches positions for its one token: what is left for text
        self.extra = tower.cfg.n_patches - 1
        self.max_length = decoder.cfg.max_seq_len - self.extra
        self.eos_id, self.bos_id = decoder.cfg.eos_token_id, decoder.cfg.bos_token_id

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             weights: str | None = None, use_cache: bool = True) -> VisionLM:
        from slmkit.formats.vision_dir import load_vision_dir
        if weights not in (None,):
            raise ValueError(f"weights {weights!r}: a vision model runs with float weights (fp32 or bf16) only")
        decoder, tower, tokenizer = load_vision_dir(path, device=device, dtype=dtype)
        return cls(prepare_for_decoding(decoder), tower, tokenizer, name=str(path), use_cache=use_cache)

    # text alone: the decoder's own TorchLM
    def logprobs(self, ids: Sequence[int], top_k: int = 0) -> LogProbs:
        return self.text.logprobs(ids, top_k)

    def logprobs_batch(self, sequences: list[Sequence[int]], top_k: int = 0) -> list[LogProbs]:
        return self.text.logprobs_batch(sequences, top_k)

    @torch.inference_mode()
    def image_embeddings(self, images: list[np.ndarray]) -> torch.Tensor:
        """(len(images), n_patches, dim) decoder input embeddings of uint8 (S, S, 3) images."""
        return self.tower(self.tower.pixels(images))

    def check_images(self, prompt_ids: Sequence[int], images: list | None) -> None:
        n_tokens = sum(1 for t in prompt_ids if t == self.image_token_id)
        n_images = len(images or [])
        if n_images > 1:
            raise ValueError(f"{n_images} images: this model looks at one image per request")
        if n_tokens != n_images:
            raise ValueError(f"the prompt has {n_tokens} {self.image_token} tokens for {n_images} images; "
                             f"give one {self.image_token} per image")

    def stream_ids(self, prompt_ids, params: SamplingParams, first_allowed=None, images: list | None = None
                   ) -> Iterator[int]:
        """Token ids after `prompt_ids`; with `images` (uint8 (S, S, 3) arrays, one per image token), the images'
        embeddings stand in for their tokens."""
        self.check_images(prompt_ids, images)
        if not images:
            return self.text.stream_ids(prompt_ids, params, first_allowed)
        model, cfg = self.model, self.model.cfg
        embeds = self.image_embeddings(images)
        p = next(model.parameters())
        prompt = torch.tensor([list(prompt_ids)])
        cache = KVCache(cfg, 1, min(cfg.max_seq_len, prompt.shape[1] + self.extra + params.max_new_tokens),
                        device=p.device, dtype=p.dtype)
        shift = 0  # positions the image adds beyond its token, in the current window

        def forward(window: torch.Tensor, cached: int) -> torch.Tensor:
            nonlocal shift
            window = window.to(p.device)
            if cached == 0:  # the first step, or the window slid: run the whole window, image spliced in
                cache.length, has_image = 0, bool((window == self.image_token_id).any())
                shift = self.extra if has_image else 0
                x, _ = splice(model, window, embeds if has_image else None, self.image_token_id)
                return model(window, cache=cache, embeds=x)[:, -1]
            cache.length = cached + shift
            return model(window[:, cached:], cache=cache)[:, -1]

        steps = decode(forward, prompt, params, self.max_length, first_allowed=first_allowed)
        return until_end(steps, end_ids(params, cfg.eos_token_id, cfg.bos_token_id))

    def stream_image_chat(self, messages: list[dict], images: list, params: SamplingParams | None = None
                          ) -> Iterator[str]:
        """The assistant's reply to `messages` (their text holding one image token per image), as text pieces."""
        params = params or self.sampling_params()
        params = dataclasses.replace(params, stop=with_chat_stops(params.stop, self.tokenizer))
        ids = self.encode_prompt(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        return stream_text(self.tokenizer, self.stream_ids(ids, params, None, images=images), params)

    def answer(self, image, question: str, params: SamplingParams | None = None) -> str:
        """The reply to one question about one image (a file path, bytes or a uint8 array), through the chat
        template; `image=None` asks the question without the image."""
        if image is None:
            return "".join(self.stream_chat([{"role": "user", "content": question}], params))
        pixels = image if isinstance(image, np.ndarray) else read_image(image, self.tower.cfg.image_size)
        messages = [{"role": "user", "content": image_prompt(question, self.image_token)}]
        return "".join(self.stream_image_chat(messages, [pixels], params))


def ask_image(lm: LM, name: str, image, question: str, params: SamplingParams | None = None) -> Iterator[str]:
    """`slm generate MODEL --image FILE QUESTION`: the reply's text pieces, or a one-line error when the model has
    no vision part (another backend, or a text-only model) or the file is not an image."""
    if not getattr(lm, "accepts_images", False):
        raise ValueError(f"{name} has no vision part ({type(lm).__name__}): --image needs a vision model "
                         "(`slm quickstart vision` makes one) on the torch backend")
    pixels = read_image(image, lm.tower.cfg.image_size)
    return lm.stream_image_chat([{"role": "user", "content": image_prompt(question, lm.image_token)}], [pixels],
                                params)
