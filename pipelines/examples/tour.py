"""A one-minute tour of the foundation, printed (the main job before the recommendation pipeline landed).

    python -m moa.pipelines.examples.tour [--out outputs/tour] [--steps 60]

1. attach a top-k routed pool of LoRA experts to a tiny Llama built from a config, and train it with Lightning
   on a seeded two-domain sequence task (the routers' load-balancing loss included);
2. save and load it back (safetensors + JSON) and check the outputs are identical;
3. import two PEFT LoRA adapters as the experts of a static-routed pool, serve a mixed batch, export a fixed
   mixture back to PEFT and merge a route into the base weights, checking each against PEFT itself;
4. run the grouped expert kernel's implementations side by side on one shape.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM

import moa
from moa.experts import grouped_lora, runnable_impls
from moa.lightning import MoAModule

VOCAB = 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


class TwoDomainSequences(Dataset):
    """Domain 0 continues a sequence by +1 (mod V), domain 1 by +3: the same tokens need different experts."""

    def __init__(self, n: int, length: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.domain = torch.randint(0, 2, (n,), generator=g)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        step = torch.where(self.domain == 0, 1, 3).unsqueeze(1)
        self.tokens = (start + step * torch.arange(length)) % VOCAB

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i], "domain_ids": self.domain[i]}


def step(title: str) -> None:
    print(f"\n== {title}")


def train_topk(out: Path, steps: int) -> None:
    step("1. top-k routed LoRA experts in a tiny Llama, trained with Lightning")
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    config = moa.MoAConfig(n_experts=4, r=8, router="topk", top_k=2, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    model = moa.attach(base, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"attached {len(model.moa_layers())} MoA layers (E=4, r=8, top-2); trainable {trainable:,} of {total:,} parameters")
    data = DataLoader(TwoDomainSequences(512), batch_size=32, shuffle=True)
    held_out = next(iter(DataLoader(TwoDomainSequences(128, seed=1), batch_size=128)))

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(input_ids=held_out["input_ids"], labels=held_out["labels"]).loss.item()

    before = eval_loss()
    model.train()
    module = MoAModule(model, lr=3e-3)
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )
    t0 = time.perf_counter()
    trainer.fit(module, data)
    after = eval_loss()
    print(f"held-out LM loss {before:.3f} -> {after:.3f} after {steps} steps ({time.perf_counter() - t0:.1f} s)")
    balance = trainer.callback_metrics.get("train/aux/load_balance")
    print(f"load-balancing loss at the last step (sum over layers, coef 0.01): {float(balance):.4f}")
    usage = next(iter(model.routing_stats().values()))
    print(f"expert usage in the first layer: {[round(u, 2) for u in usage.tolist()]}")

    step("2. save_pretrained / moa.load round trip")
    saved = model.save_pretrained(out / "topk")
    print(f"wrote {sorted(p.name for p in saved.iterdir())}")
    reloaded = moa.load(saved, pristine).eval()
    with torch.no_grad():
        diff = (model(input_ids=held_out["input_ids"]).logits - reloaded(input_ids=held_out["input_ids"]).logits).abs().max()
    print(f"max |logits difference| after reload: {diff.item():.1e}")


def peft_round_trip(out: Path) -> None:
    step("3. PEFT LoRA adapters as experts: mixed batch, export, merge")
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_llama()
    folders = {}
    for i, (name, rank) in enumerate([("books", 4), ("movies", 8)]):
        torch.manual_seed(10 + i)
        peft_model = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        folders[name] = out / "peft" / name
        peft_model.save_pretrained(str(folders[name]))
    print(f"saved PEFT adapters {list(folders)} (ranks 4 and 8)")

    model = moa.from_peft(copy.deepcopy(base), folders).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = PeftModel.from_pretrained(copy.deepcopy(base), str(folders["books"]), adapter_name="books").eval()
    reference.load_adapter(str(folders["movies"]), adapter_name="movies")
    with torch.no_grad():
        mixed = model(input_ids=ids, expert_ids=[0, 1]).logits
        expected = reference(input_ids=ids, adapter_names=["books", "movies"]).logits
    print(f"mixed batch (books, movies) vs PEFT adapter_names: max diff {(mixed - expected).abs().max().item():.1e}")

    route = [0.25, 0.75]
    exported = moa.to_peft(model, out / "peft" / "blend", route=route, overwrite=True)
    blend = PeftModel.from_pretrained(copy.deepcopy(base), str(exported)).eval()
    with torch.no_grad():
        ours = model(input_ids=ids, expert_weights=[route, route]).logits
        theirs = blend(input_ids=ids).logits
    print(f"fixed mixture {route} exported as one PEFT LoRA: max diff {(ours - theirs).abs().max().item():.1e}")
    merged = moa.merge(model, route)
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - ours).abs().max().item()
    print(f"merged into the base weights (plain {type(merged).__name__}): max diff {diff:.1e}")


def kernels() -> None:
    step("4. grouped expert kernel implementations (N=1024, d=256, E=16, r=8, k=2, forward+backward)")
    g = torch.Generator().manual_seed(0)
    N, d, E, r, k = 1024, 256, 16, 8, 2
    x = torch.randn(N, d, generator=g, requires_grad=True)
    A = (torch.randn(E, r, d, generator=g) * 0.05).requires_grad_()
    B = (torch.randn(E, d, r, generator=g) * 0.05).requires_grad_()
    w, ids = torch.randn(N, E, generator=g).softmax(-1).topk(k)
    reference = None
    for impl in ["loop", *sorted(set(runnable_impls("cpu")) - {"loop"}), "auto"]:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            y = grouped_lora(x, A, B, ids, w, impl=impl)
            y.sum().backward()
            times.append(time.perf_counter() - t0)
        reference = y.detach() if reference is None else reference
        err = (y.detach() - reference).abs().max().item()
        print(f"  {impl:8s} {sorted(times)[2] * 1e3:7.2f} ms   max diff vs loop {err:.1e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/tour"), help="where saved models go")
    parser.add_argument("--steps", type=int, default=60, help="training steps")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    train_topk(args.out, args.steps)
    peft_round_trip(args.out)
    kernels()
    print(f"\ndone; artifacts in {args.out}/")


if __name__ == "__main__":
    main()
