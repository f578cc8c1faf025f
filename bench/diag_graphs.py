"""Which settings let the 1B-shape QLoRA stack be captured as CUDA graphs (diagnostic).

After two eager steps (optionally with an optimizer step each, --opt), graphs are switched on, the
stack is captured at the next forward and trains 2 steps; prints capture success, the failing piece
and the losses against eager. Edit the backend / mode tuples in main() to try SDPA backends and
capture_error_modes (2026-11-28, H200: default SDPA with global, thread_local and relaxed all capture;
forced flash fails eagerly in checkpoint recompute, forced efficient has no kernel for this shape).

    python bench/diag_graphs.py --ckpt /tmp/vb/llama-1b
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import TARGETS  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--opt", choices=["none", "adamw", "adamw8bit"], default="none",
                   help="optimizer step after each step (capture then follows optimizer steps)")
    args = p.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from velotune import FastLanguageModel, set_cuda_graphs
    from velotune.models import graphs

    base, _ = FastLanguageModel.from_pretrained(args.ckpt, max_seq_length=args.seq, dtype=torch.bfloat16,
                                                load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(base, r=16, target_modules=TARGETS, lora_alpha=16, lora_dropout=0,
                                             bias="none", use_gradient_checkpointing=True, random_state=3407)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, args.seq), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}

    params = [q for q in model.parameters() if q.requires_grad]
    opt = None
    if args.opt == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-5)
    elif args.opt == "adamw8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-5)

    def losses(mode, backend):
        set_cuda_graphs(model, mode)
        out = []
        for _ in range(2):
            ctx = sdpa_kernel(backends[backend]) if backends[backend] else contextlib.nullcontext()
            with ctx, torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if opt is not None:
                opt.step()
            model.zero_grad(set_to_none=True)
            out.append(round(loss.item(), 5))
        st = graphs.state_of(model.get_base_model())
        return out, st.captures, st.broken

    for backend in ("default",):
        try:
            ref = losses(False, backend)[0]
        except Exception as e:  # noqa: BLE001
            print(f"[diag] {backend}: eager fails: {e}"[:300], flush=True)
            continue
        for mode in ("global",):
            graphs.CAPTURE_ERROR_MODE = mode
            try:
                got, caps, broken = losses(True, backend)
                print(f"[diag] sdpa={backend:9s} mode={mode:12s} captured={caps} eager={ref} graphs={got} "
                      f"broken={str(broken)[:200]}", flush=True)
            except Exception:  # noqa: BLE001
                print(f"[diag] sdpa={backend} mode={mode} raised: {traceback.format_exc()[-600:]}", flush=True)
            torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
