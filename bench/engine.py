"""The batched engine in-process against transformers' `generate`, side by side, on the CPU or a GPU.

    flock /tmp/loraloop-cpu.lock .venv/bin/python bench/engine.py             # this machine, dtype auto
    python bench/engine.py --device cuda --batch 1,32,128,256                 # a GPU machine
    python bench/engine.py --device cuda --random-weights DIR                 # DIR: config.json + tokenizer only

No HTTP and no server (`bench/serving.py` measures those): N requests go to one `BatchedEngine` at once,
each generating exactly `--max-tokens` greedy tokens (EOS ignored), against `generate` on a static batch
of the same N chat prompts (left padded), same weights, dtype and device, run by the same invocation in a
process of its own (two OpenMP thread pools in one process slow each other down). Then the
engine with 8 different adapters mixed in the batch against one adapter, and the correctness checks on
that device: greedy tokens of the prompts run together equal each run alone, and in fp32 equal
`generate` one request at a time. `--random-weights` builds the bundled model's architecture with
random weights (for a machine without the weights; speed does not depend on their values).
Prints a table and writes a JSON file (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serving import MODEL_CACHE, PROMPTS, save_random_adapters  # noqa: E402
from serving import base_model  # noqa: E402
from serving.adapters.store import LoRAWeights, read_version, write_version  # noqa: E402
from serving.engine.batched import BatchedEngine  # noqa: E402
from serving.engine.cpu_threads import claim_cores, keep_this_thread_serial  # noqa: E402
from serving.engine.lora import SERVABLE_MODULES  # noqa: E402
from serving.engine.types import GenerationRequest, SamplingParams  # noqa: E402
from serving.prompt import render_prompt  # noqa: E402
from tests.helpers import greedy_reference  # noqa: E402


def model_dir_for(args: argparse.Namespace, work: Path) -> Path:
    """The bundled model's converted dir, or (`--random-weights`) its architecture with random weights."""
    if not args.random_weights:
        return base_model.prepare_bundled_model(MODEL_CACHE)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.random_weights))
    model_dir = work / "random-model"
    model.save_pretrained(model_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(args.random_weights).save_pretrained(model_dir)
    return model_dir


def load(args: argparse.Namespace, model_dir: Path) -> tuple[Any, Any, list[list[int]]]:
    """(model on the device in the dtype, tokenizer, the chat prompts of the largest level)."""
    from transformers import AutoTokenizer

    device = base_model.resolve_device(args.device)
    model = base_model.load_model(model_dir, device, base_model.resolve_dtype(args.dtype, device))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    return model, tokenizer, [chat[i % len(chat)] for i in range(max(args.batches))]


def make_adapters(model_dir: Path, work: Path, count: int) -> list[LoRAWeights]:
    """`count` random rank-16 LoRAs on every servable projection, stored and read back as the server does."""
    out = []
    for number, source in enumerate(save_random_adapters(model_dir, work / "sources", count), start=1):
        stored = write_version(work / "store", "default", number, source)
        out.append(
            read_version(
                work / "store", stored.relative_path, stored.sha256, max_rank=32, allowed_modules=SERVABLE_MODULES
            )
        )
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


async def engine_run(
    engine: BatchedEngine, prompts: list[list[int]], max_tokens: int, adapters: list[str | None]
) -> tuple[float, list[list[int]]]:
    """All prompts at once (the i-th on adapters[i % len]); (completion tok/s, each request's tokens)."""
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    async def one(i: int, prompt: list[int]) -> list[int]:
        tokens: list[int] = []
        request = GenerationRequest(f"r{i}", prompt, greedy, adapter_key=adapters[i % len(adapters)])
        async for chunk in engine.generate(request):
            tokens += chunk.token_ids
        return tokens

    start = time.perf_counter()
    outputs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    seconds = time.perf_counter() - start
    return sum(map(len, outputs)) / seconds, outputs


def hf_run(model: Any, tokenizer: Any, prompts: list[list[int]], max_tokens: int) -> float:
    """transformers' `generate` on one static, left-padded batch: completion tok/s."""
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    sync(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    sync(model.device)
    return (out.shape[1] - width) * len(prompts) / (time.perf_counter() - start)


def baseline(args: argparse.Namespace) -> dict[str, Any]:
    """`--baseline-only`, in a process of its own: `generate` at each level, and the checks' references."""
    claim_cores()
    model, tokenizer, prompts = load(args, args.model_dir)
    hf_run(model, tokenizer, prompts[:2], 8)  # warm-up
    levels = {}
    for n in args.batches:
        hf_run(model, tokenizer, prompts[:n], 8)  # this batch size's first kernels and allocations
        levels[n] = hf_run(model, tokenizer, prompts[:n], args.max_tokens)
        print(f"batch {n}: generate {levels[n]:.1f} tok/s", flush=True)
    references = [greedy_reference(model, p, args.check_tokens) for p in prompts[: len(PROMPTS)]]
    return {"levels": levels, "references": references}


async def bench(args: argparse.Namespace, work: Path, baseline: dict[str, Any] | None) -> dict[str, Any]:
    model, tokenizer, prompts = load(args, args.model_dir)
    report: dict[str, Any] = {
        "device": str(model.device),
        "device_name": torch.cuda.get_device_name(model.device)
        if model.device.type == "cuda"
        else platform.processor(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "random_weights": bool(args.random_weights),
        "max_tokens": args.max_tokens,
        "levels": {},
    }
    engine = BatchedEngine(model, tokenizer, max_running=max(args.batches), max_batched_tokens=args.max_batched_tokens)
    engine.eos_ids = frozenset()  # every request generates exactly max_tokens
    await engine.start()
    try:
        for i, weights in enumerate(make_adapters(args.model_dir, work, 8)):
            await engine.load_adapter(f"v{i + 1}", weights)
        await engine_run(engine, prompts[:2], 8, [None])  # warm-up: first kernels, allocator
        for n in args.batches:
            await engine_run(engine, prompts[:n], 8, [None])  # this batch size's first kernels and allocations
            tok_s, _ = await engine_run(engine, prompts[:n], args.max_tokens, [None])
            hf = baseline["levels"][n] if baseline else float("nan")
            report["levels"][n] = {"hf_generate": round(hf, 1), "loraloop": round(tok_s, 1), "ratio": tok_s / hf}
            print(f"batch {n}: loraloop {tok_s:.1f} tok/s, generate {hf:.1f}: {tok_s / hf:.2f}x", flush=True)
        n = max(args.batches)
        # One adapter is merged into the weights after `merge_after_steps` steps of it alone (the steady state
        # of a server whose traffic uses one version): let that happen before the measured run.
        await engine_run(engine, prompts[:n], 2 * engine.merge_after_steps, ["v1"])
        while engine.merging:
            await asyncio.sleep(0.05)
        one, _ = await engine_run(engine, prompts[:n], args.max_tokens, ["v1"])
        eight = [f"v{i + 1}" for i in range(8)]
        await engine_run(engine, prompts[:n], 8, eight)  # warm-up, as for the levels
        mixed, _ = await engine_run(engine, prompts[:n], args.max_tokens, eight)
        report["adapters"] = {"batch": n, "one": round(one, 1), "mixed_8": round(mixed, 1), "ratio": mixed / one}
        print(f"batch {n}: one adapter {one:.1f} tok/s, 8 mixed {mixed:.1f}: {mixed / one:.2f}x", flush=True)
        references = baseline["references"] if baseline else None
        report["checks"] = await checks(engine, prompts[: len(PROMPTS)], args.check_tokens, references)
        if model.device.type == "cuda":
            report["gpu_busy"] = {n: await gpu_busy(engine, prompts[:n]) for n in sorted({1, max(args.batches)})}
    finally:
        await engine.stop()
    if model.device.type == "cuda":
        report["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(model.device) / 2**20)
    return report


async def gpu_busy(engine: BatchedEngine, prompts: list[list[int]], max_tokens: int = 32) -> dict[str, Any]:
    """How much of a run's wall time the GPU spends in kernels, and kernels launched per generated token
    step: an eager engine whose GPU sits idle between small kernels is bound by launching them."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        await engine_run(engine, prompts, max_tokens, [None])
        wall_us = (time.perf_counter() - start) * 1e6
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy_us = sum(e.device_time_total for e in kernels)
    out = {
        "rows": len(prompts),
        "wall_ms": round(wall_us / 1e3, 1),
        "kernel_ms": round(busy_us / 1e3, 1),
        "busy": round(busy_us / wall_us, 3),
        "kernels_per_token_step": round(len(kernels) / max_tokens, 1),
    }
    print(f"gpu busy at {len(prompts)} rows: {json.dumps(out)}", flush=True)
    return out


async def checks(
    engine: BatchedEngine, prompts: list[list[int]], max_tokens: int, references: list[list[int]] | None
) -> dict[str, Any]:
    """Greedy tokens together vs alone (base, and mixed adapters), and the base alone vs `generate` alone."""
    mix = [None, "v1", "v2", "v3"]
    out: dict[str, Any] = {}
    for name, adapters in (("base", [None]), ("mixed", mix)):
        alone = [
            (await engine_run(engine, [p], max_tokens, [adapters[i % len(adapters)]]))[1][0]
            for i, p in enumerate(prompts)
        ]
        _, together = await engine_run(engine, prompts, max_tokens, adapters)
        same = sum(a == b for a, b in zip(alone, together, strict=True))
        agree = sum(x == y for a, b in zip(alone, together, strict=True) for x, y in zip(a, b, strict=True))
        out[name] = {"prompts": len(prompts), "identical": same, "token_agreement": agree / (len(prompts) * max_tokens)}
        if name == "base" and references is not None:
            out["base_vs_generate_identical"] = sum(a == b for a, b in zip(alone, references, strict=True))
    print(f"checks ({max_tokens} tokens): {json.dumps(out)}", flush=True)
    return out


def main() -> None:
    # Before any tensor work: the engine's thread gets the cores, as in the server. A thread that has run
    # parallel work keeps an OpenMP pool, and a second pool halved the engine's speed on a 2-core VM (single
    # stream 20.6 against 39.1 tok/s), so the baseline runs in a process of its own.
    keep_this_thread_serial()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", default="1,32", help="concurrent requests per level, comma separated")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-batched-tokens", type=int, default=256)
    parser.add_argument("--check-tokens", type=int, default=32)
    parser.add_argument("--random-weights", type=Path, help="a dir with config.json and the tokenizer")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--baseline-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("/tmp/loraloop-bench-engine.json"))
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batch.split(",")]
    if args.baseline_only:
        args.out.write_text(json.dumps(baseline(args)))
        return
    with tempfile.TemporaryDirectory(prefix="loraloop-bench-engine-") as tmp:
        args.model_dir = model_dir_for(args, Path(tmp))
        reference = None
        if not args.skip_baseline:
            out = Path(tmp) / "baseline.json"
            command = [
                sys.executable,
                __file__,
                "--baseline-only",
                "--model-dir",
                str(args.model_dir),
                "--out",
                str(out),
            ]
            for flag in ("device", "dtype", "batch", "max_tokens", "check_tokens"):
                command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            subprocess.run(command, check=True)
            reference = json.loads(out.read_text())
            reference["levels"] = {int(n): v for n, v in reference["levels"].items()}
        report = asyncio.run(bench(args, Path(tmp), reference))
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
