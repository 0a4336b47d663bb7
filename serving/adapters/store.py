"""The adapter store: immutable LoRA versions on disk, shared by replicas and the tuner.

Layout: `<adapter dir>/<alias>/v<N>/{adapter_config.json, adapter_model.safetensors}`.
A version is written into a temp dir beside its final place, fsynced, hashed and renamed, so a
reader sees either nothing or the whole version (DESIGN.md §5). Reading verifies the content hash
recorded in the registry and the LoRA config before a single weight reaches the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from serving import failpoints

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Pickle-based formats can run code on load: never read them, whatever their name.
REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class AdapterRejected(ValueError):
    """A stored version failed verification; the reason is safe to log and record."""


@dataclass(frozen=True)
class StoredVersion:
    relative_path: str
    sha256: str


@dataclass(frozen=True)
class LoRAWeights:
    """A verified adapter, ready to be copied into an engine slot."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    tensors: dict[str, torch.Tensor]  # PEFT keys: base_model.model.<module>.lora_{A,B}.weight

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def content_sha256(directory: Path) -> str:
    """Hash of the adapter files, name and bytes, in a fixed order."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        digest.update(name.encode())
        with (directory / name).open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_version(store: Path, alias: str, version: int, source: Path) -> StoredVersion:
    """Copy a freshly saved adapter into the store as `<alias>/v<version>`, atomically."""
    for name in ADAPTER_FILES:
        if not (source / name).is_file():
            raise AdapterRejected(f"{source} has no {name}: only safetensors adapters are stored")
    parent = store / alias
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / f"v{version}"
    if final.exists():
        raise FileExistsError(f"{final} exists: versions are immutable")
    staging = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=parent))
    try:
        for name in ADAPTER_FILES:
            shutil.copyfile(source / name, staging / name)
            _fsync_path(staging / name)
        _fsync_path(staging)
        sha256 = content_sha256(staging)
        failpoints.hit("adapter-written")
        os.rename(staging, final)  # atomic on one filesystem; fails if `final` appeared meanwhile
        _fsync_path(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return StoredVersion(relative_path=f"{alias}/v{version}", sha256=sha256)


def sweep(store: Path, alias: str, registered: set[str]) -> list[str]:
    """Move aside what crashed rounds left: staging dirs, and version dirs the registry never recorded.

    Called under the round lock, so no other writer is mid-write. Nothing is deleted: leftovers are
    renamed to hidden `.orphan-*` names, out of every reader's way.
    """
    parent = store / alias
    moved: list[str] = []
    if not parent.is_dir():
        return moved
    for entry in sorted(parent.iterdir()):
        relative = f"{alias}/{entry.name}"
        is_staging = entry.name.startswith(".v")
        is_unregistered = entry.name.startswith("v") and relative not in registered
        if entry.is_dir() and (is_staging or is_unregistered):
            target = parent / f".orphan-{entry.name.lstrip('.')}-{os.getpid()}"
            os.rename(entry, target)
            moved.append(relative)
    return moved


def _validate_config(config: dict[str, Any], *, max_rank: int, allowed_modules: frozenset[str]) -> None:
    if config.get("peft_type") != "LORA":
        raise AdapterRejected(f"only LoRA adapters are served, this one is {config.get('peft_type')!r}")
    rank = config.get("r")
    if not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise AdapterRejected(f"LoRA rank {rank!r} is outside 1..{max_rank}")
    if config.get("use_dora") or config.get("modules_to_save"):
        raise AdapterRejected("DoRA and modules_to_save are not supported for serving")
    targets = config.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise AdapterRejected(f"target_modules must be an explicit list, got {targets!r}")
    unknown = set(targets) - allowed_modules
    if unknown:
        raise AdapterRejected(f"target modules {sorted(unknown)} are not servable (allowed: {sorted(allowed_modules)})")


def read_version(
    store: Path,
    relative_path: str,
    expected_sha256: str,
    *,
    max_rank: int,
    allowed_modules: frozenset[str],
) -> LoRAWeights:
    """Load one stored version after checking its files, hash and config; raise AdapterRejected otherwise."""
    directory = (store / relative_path).resolve()
    if not directory.is_relative_to(store.resolve()):
        raise AdapterRejected(f"{relative_path!r} points outside the adapter store")
    if not directory.is_dir():
        raise AdapterRejected(f"{directory} does not exist")
    pickles = [p.name for p in directory.iterdir() if p.suffix in REFUSED_SUFFIXES]
    if pickles:
        raise AdapterRejected(f"refusing pickle files {pickles}: only safetensors are loaded")
    for name in ADAPTER_FILES:
        if not (directory / name).is_file():
            raise AdapterRejected(f"{directory} has no {name}")
    actual = content_sha256(directory)
    if actual != expected_sha256:
        raise AdapterRejected(f"content hash {actual[:12]}… does not match the registry's {expected_sha256[:12]}…")
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterRejected(f"adapter_config.json is unreadable: {exc}") from exc
    _validate_config(config, max_rank=max_rank, allowed_modules=allowed_modules)
    try:
        tensors = load_file(directory / "adapter_model.safetensors")
    except Exception as exc:  # safetensors raises several types for truncated/corrupt files
        raise AdapterRejected(f"adapter_model.safetensors is unreadable: {exc}") from exc
    return LoRAWeights(
        rank=int(config["r"]),
        alpha=float(config.get("lora_alpha", config["r"])),
        target_modules=tuple(config["target_modules"]),
        tensors=tensors,
    )
