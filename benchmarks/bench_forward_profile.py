"""Where a sparsified forward's time goes, on any device: the model body dense and sparsified per
site, the rule's threshold search alone on the site's activations, and the full-vocabulary
float32 log-softmax that scoring adds, side by side in one process (alternated, warmed up, medians).

Weights are random (the model's real config, full size): the timings need shapes, not trained
values, so a GPU run needs no checkpoint. ``--profile`` prints the operators that took the most
device time in one sparsified forward.

    python benchmarks/bench_forward_profile.py --model gemma3-270m --device cuda --batch 16 --sequence 256
"""

from __future__ import annotations

import argparse
import statistics

import torch
from device_timing import device_seconds, synchronize

from common.core.sites import SITES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m",
                        help="an alias or hub id whose config is shipped or cached, or a folder with a config.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sequence", type=int, default=256)
    parser.add_argument("--sites", nargs="+", choices=SITES, default=["intermediate", "input", "all_inputs"])
    parser.add_argument("--value", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print the top operators of one sparsified forward")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from common.core.hooks import ActivationCapture, Sparsifier
    from common.core.rules import keep_threshold
    from common.models.plan import plan_config

    config, source = plan_config(args.model)
    if config is None:
        raise SystemExit(f"error: no config for {args.model}: {source}")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.sequence), device=device)
    with torch.no_grad():
        reference = model(ids, logits_to_keep=1).logits

    def body():
        with torch.no_grad():
            model(ids, logits_to_keep=1)

    def sparse(site):
        def run():
            with Sparsifier(model, site, rule="topp", value=args.value), torch.no_grad():
                model(ids, logits_to_keep=1)
        return run

    captured = {}
    for site in args.sites:
        with ActivationCapture(model, site, keep=True) as capture, torch.no_grad():
            model(ids, logits_to_keep=1)
        captured[site] = [rows for per_forward in capture.activations.values() for rows in per_forward]

    def thresholds(site):
        def run():
            for tensor in captured[site]:
                keep_threshold(tensor, "topp", args.value)
        return run

    def scoring():
        with torch.no_grad():
            logits = model(ids).logits
            torch.log_softmax(logits.float(), dim=-1)

    runs = {"dense body": body, "log-softmax scoring (full logits)": scoring}
    for site in args.sites:
        runs[f"{site}: sparsified body"] = sparse(site)
        runs[f"{site}: threshold search alone"] = thresholds(site)
    times = {name: [] for name in runs}
    for name, fn in runs.items():
        device_seconds(fn, device)  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(device_seconds(fn, device))
    with torch.no_grad():  # the hooks left with their blocks: the model is dense again
        unchanged = torch.equal(model(ids, logits_to_keep=1).logits, reference)
    dense = statistics.median(times["dense body"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.model} (random weights, {config.num_hidden_layers} layers), {args.dtype}, {name}, "
          f"batch {args.batch} x {args.sequence} tokens, top-p {args.value}, medians of {args.repeats}; "
          f"dense output unchanged afterwards: {unchanged}")
    print("| what | ms | / dense body |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {1000 * median:.3g} | {median / dense:.2f} |")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            sparse(args.sites[0])()
            synchronize(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=15))


if __name__ == "__main__":
    main()
