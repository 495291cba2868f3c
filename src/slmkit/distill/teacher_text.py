"""Sequence-level distillation data: a token dataset of text the teacher wrote (Kim & Rush, 2016).

For each training window of a token dataset, the first `prompt_tokens` real tokens stay and the teacher writes
the rest of the window by sampling. A student then trains on the result with plain `slm train`; the validation
split is the source's real text, copied unchanged, so students are always measured against real text.

This also works when teacher and student tokenizers differ (where logit distillation cannot): the teacher then
continues the decoded prompt as text (any backend, a remote endpoint included), and the prompt + continuation is
tokenized with the student's tokenizer. A same-tokenizer teacher that slmkit runs itself samples whole batches
of windows at once with a KV cache, which is several times faster on a CPU.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from slmkit.files import atomic_write_json


def write_teacher_text(teacher: str, data: str | Path, out: str | Path, *, prompt_tokens: int = 32,
                       seq_len: int = 256, max_tokens: int | None = None, temperature: float = 0.8,
                       batch_size: int = 8, backend: str = "auto", seed: int = 0, progress: bool = True,
                       log=print) -> dict:
    """Write token dataset `out`: for each of the first windows of `data` (up to `max_tokens`), `prompt_tokens`
    real tokens + the teacher's continuation to `seq_len` + 1 tokens. Interrupted runs continue (progress.json);
    meta.json appears when the dataset is complete."""
    from slmkit.data.tokens import SplitCounts, SplitWriter, TokenDataset, dataset_tokenizer, write_meta
    from slmkit.distill.teacher import TokenizerMismatch, check_same_tokenizer, open_teacher_lm
    from slmkit.lm.torch_lm import TorchLM
    data, out = Path(data), Path(out)
    if (out / "meta.json").exists():
        raise FileExistsError(f"{out} already holds a complete dataset; choose another -o")
    if not 0 < prompt_tokens < seq_len:
        raise ValueError(f"prompt_tokens must be between 1 and seq_len - 1 ({seq_len - 1}), got {prompt_tokens}")
    source = TokenDataset(data)
    student_tok = dataset_tokenizer(data)
    if student_tok is None:
        raise FileNotFoundError(f"{data}/tokenizer: the dataset's tokenizer is needed to write the prompts as text")
    lm = open_teacher_lm(teacher, backend)
    try:
        check_same_tokenizer(lm.tokenizer, student_tok, teacher)
        batched = isinstance(lm, TorchLM)
    except TokenizerMismatch:
        batched = False
        log(f"teacher {teacher} has another tokenizer: it continues each prompt as text, which the student's "
            "tokenizer then encodes")
    windows = source.num_train_windows(seq_len)
    if max_tokens:
        windows = min(windows, max(1, max_tokens // seq_len))
    settings = {"teacher": str(teacher), "data": str(data), "prompt_tokens": prompt_tokens, "seq_len": seq_len,
                "windows": windows, "temperature": temperature, "seed": seed, "batched": batched}
    done, elapsed, counts = 0, 0.0, None
    if (out / "progress.json").exists():
        prev = json.loads((out / "progress.json").read_text())
        if prev["settings"] != settings:
            raise ValueError(f"{out} holds an unfinished dataset made with other settings; use another -o")
        done, elapsed = prev["windows_done"], prev["elapsed_s"]
        counts = SplitCounts(tokens=prev["tokens"], documents=done, bytes=prev["bytes"])
        log(f"resuming at window {done:,} of {windows:,}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(data / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
        shutil.copyfile(data / "val.bin", out / "val.bin")
    # one record per window; resuming cuts off whatever an interruption left after the last one
    train_bin = SplitWriter(out / "train.bin", source.meta["dtype"], counts)
    bar = tqdm(total=windows, initial=done, unit="window", disable=not progress, desc="teacher text")
    t0 = time.perf_counter() - elapsed
    teacher_tokens = 0
    try:
        while done < windows:
            rows = list(range(done, min(windows, done + batch_size)))
            prompts = [np.asarray(source.train[w * seq_len:w * seq_len + prompt_tokens], dtype=np.int64)
                       for w in rows]
            if batched:
                seqs = _sample_batch(lm, prompts, seq_len + 1, temperature, seed + done)
            else:
                seqs = [_continue_as_text(lm, student_tok, p, seq_len + 1 - prompt_tokens, temperature, seed + w)
                        for p, w in zip(prompts, rows, strict=True)]
            for s in seqs:
                s = s[:seq_len]  # windows are seq_len apart: each sequence fills exactly one
                train_bin.write(s, len(student_tok.decode(list(s)).encode("utf-8")))
                teacher_tokens += len(s) - prompt_tokens
            train_bin.flush()
            done = rows[-1] + 1
            bar.update(len(rows))
            bar.set_postfix_str(f"{teacher_tokens / max(time.perf_counter() - t0 - elapsed, 1e-9):,.0f} teacher "
                                "tok/s")
            atomic_write_json(out / "progress.json", {"settings": settings, "windows_done": done,
                                                      "tokens": train_bin.counts.tokens,
                                                      "bytes": train_bin.counts.bytes,
                                                      "elapsed_s": time.perf_counter() - t0})
    finally:
        bar.close()
        train_bin.close()
    seconds = time.perf_counter() - t0
    generated = windows * (seq_len - prompt_tokens)
    meta = write_meta(out, dtype=source.meta["dtype"], vocab_size=source.vocab_size,
                      bos_id=source.meta.get("bos_id"), eos_id=source.meta.get("eos_id"),
                      tokenizer_sha256=source.meta.get("tokenizer_sha256"),
                      splits={"train": train_bin.counts, "val": source.meta["splits"]["val"]},
                      manifest_sha256=source.meta.get("manifest_sha256"),
                      teacher_text={**settings, "seconds": round(seconds, 1),
                                    "teacher_tokens_per_s": round(generated / max(seconds, 1e-9), 1)})
    (out / "progress.json").unlink(missing_ok=True)
    log(f"teacher text: {windows:,} windows ({train_bin.counts.tokens:,} tokens, {prompt_tokens} real + the "
        f"teacher's rest) in {seconds:.0f} s -> {out}")
    return meta


def _sample_batch(lm, prompts: list[np.ndarray], width: int, temperature: float, seed: int) -> list[np.ndarray]:
    """Continue equal-length prompts to `width` tokens, all in one batch (slmkit's decoding loop)."""
    from slmkit.lm.torch_lm import generate_batch
    from slmkit.sampling import SamplingParams
    batch = torch.from_numpy(np.stack(prompts))
    params = SamplingParams(max_new_tokens=width - batch.shape[1], temperature=temperature, stop_at_eos=False)
    new = torch.stack(list(generate_batch(lm.model, batch, params, torch.Generator().manual_seed(seed))), dim=1)
    return [row.numpy() for row in torch.cat([batch, new], dim=1)]


def _continue_as_text(lm, student_tok, prompt: np.ndarray, new_tokens: int, temperature: float,
                      seed: int) -> list[int]:
    from slmkit.sampling import SamplingParams
    text = student_tok.decode(prompt.tolist())
    params = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, seed=seed, stop_at_eos=False)
    completion = lm.generate([text], params)[0]
    return student_tok.encode(text + completion)
