"""Where one training step's time goes, on synthetic data: image tower, text tower, loss, optimizer.

    .venv/bin/python benchmarks/step_profile.py --model vlp-r10t-32-t2 --batch 128 [--compile visual] [--channels-last]
        [--no-trim]

Each part is timed on its own (forward + backward), then a whole step (both towers, CLIP loss, fused AdamW);
medians over --steps after --warmup, of wall time and of the process's CPU time (on a shared VM the wall time
swings with the host's load). Synthetic images and random tokens of the model's context length.
"""
from __future__ import annotations

import argparse
import statistics
import time

import open_clip
import torch

import vlp.models  # noqa: F401  (registers vlp's model configs)
from vlp.models.trim import trim_dead_taps, trimmed_names


def timed(fn, steps: int, warmup: int) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds of one call. On a shared VM the wall time moves with
    the host's load; CPU time (all threads of this process) moves less, so compare code variants with both."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vlp-r10t-32-t2")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=None, help="default: the model's")
    ap.add_argument("--text-len", type=int, default=None, help="tokens per caption fed (default: context length)")
    ap.add_argument("--compile", default="", choices=["", "visual", "text", "all"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--no-trim", action="store_true", help="keep the padding-only taps of small feature maps "
                    "(the trainer trims them unless model.trim_dead_taps is false)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = open_clip.create_model(args.model, output_dict=True)
    size = args.image_size or open_clip.get_model_preprocess_cfg(model)["size"][0]
    ctx = args.text_len or model.context_length
    if not args.no_trim:
        trim_dead_taps(model.visual)
    if args.channels_last:
        model.visual.to(memory_format=torch.channels_last)
    if args.compile in ("visual", "all"):
        model.visual.compile()
    if args.compile in ("text", "all"):
        model.transformer.compile()
    images = torch.randn(args.batch, 3, size, size)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    text = torch.randint(1, 49000, (args.batch, ctx))
    text[:, -1] = 49407  # end-of-text token: open_clip pools at the argmax
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def image_part():
        model.encode_image(images).sum().backward()

    def text_part():
        model.encode_text(text).sum().backward()

    def step():
        out = model(images, text)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def opt_part():
        opt.step()

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    parts = {"image fwd+bwd": timed(image_part, args.steps, args.warmup),
             "text fwd+bwd": timed(text_part, args.steps, args.warmup)}
    out = model(images, text)
    loss_fn(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    parts["optimizer step"] = timed(opt_part, args.steps, 1)  # the same gradients, stepped again
    opt.zero_grad(set_to_none=True)
    parts["whole step"] = timed(step, args.steps, args.warmup)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model} {size}px ctx {ctx} batch {args.batch} compile={args.compile or 'no'} "
          f"channels_last={args.channels_last} threads={args.threads} params={n_params / 1e6:.1f}M "
          f"first step {first:.1f}s trimmed={','.join(trimmed_names(model.visual)) or 'none'}")
    for name, (wall, cpu) in parts.items():
        print(f"  {name:15s} {1000 * wall:7.1f} ms wall {1000 * cpu:7.1f} ms CPU")
    print(f"  -> {args.batch / parts['whole step'][0]:.0f} samples/s")


if __name__ == "__main__":
    main()
