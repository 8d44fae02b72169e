"""Fine-tune LoRA adapters on a BC-quantized model with transformers.Trainer, save them, reload them.

Offline on the packaged SmolLM2-135M (4-bit RTN + BC, a few minutes on CPU):
    python examples/finetune_lora.py --steps 30 --output /tmp/smollm2-bc-lora
From an already quantized folder (e.g. written by `optimum-bc quantize`):
    python examples/finetune_lora.py --quantized /tmp/smollm2-bc --steps 30
Smoke test on a tiny random LLaMA (seconds):
    python examples/finetune_lora.py --tiny --steps 12
"""

import argparse
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import optimum_bc  # noqa: F401  (registers quant_method "bc" before any from_pretrained)
from optimum_bc import BCQuantizationConfig, QuantLinear
from optimum_bc.data.calibration_data import build_calibration_set
from optimum_bc.integrations.peft import get_peft_model, load_adapter, trainable_summary


def _tiny_quantized(folder: str, seq_len: int) -> tuple[str, list[dict[str, torch.Tensor]]]:
    """Save a random 2-layer LLaMA, quantize it (RTN 4-bit + BC) and save that; return it and training windows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(os.path.join(folder, "float"))
    ids = torch.randint(0, 128, (8, seq_len), generator=torch.Generator().manual_seed(1))
    cfg = BCQuantizationConfig(bits=4, group_size=32, method="rtn", dataset=ids, num_samples=8, seq_len=seq_len)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "float"), quantization_config=cfg)
    model.save_pretrained(os.path.join(folder, "quantized"))
    return os.path.join(folder, "quantized"), [{"input_ids": row[None]} for row in ids]


def _real_quantized(args: argparse.Namespace, folder: str) -> tuple[str, Any]:
    """The BC folder to fine-tune and its tokenizer: --quantized as given, else quantize --model now."""
    if args.quantized:
        return args.quantized, AutoTokenizer.from_pretrained(args.quantized)
    from optimum_bc.data.packaged import packaged_model_dir

    source = args.model or packaged_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(source)
    cfg = BCQuantizationConfig(
        bits=args.bits,
        group_size=128,
        method="rtn",
        dataset="wiki-vital",
        tokenizer=tokenizer,
        num_samples=8,
        seq_len=args.seq_len,
        batch_size=4,
    )
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=cfg, dtype=torch.float32)
    path = os.path.join(folder, "quantized")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


class _Windows(torch.utils.data.Dataset):
    """Causal-LM examples (labels = inputs) from ``[1, T]`` token windows."""

    def __init__(self, samples: Sequence[dict[str, torch.Tensor]]) -> None:
        self.rows = [s["input_ids"][0] for s in samples]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i].clone()}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="float model to quantize first (default: the packaged SmolLM2-135M)")
    parser.add_argument("--quantized", help="an existing BC-quantized folder (skips quantization)")
    parser.add_argument("--tiny", action="store_true", help="tiny random LLaMA and random tokens (smoke test)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    parser.add_argument("--samples", type=int, default=32, help="training windows (wiki-vital)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-4, 1e-2 with --tiny)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--train-bias", action="store_true", help="also fine-tune the bias-compensation biases")
    parser.add_argument("--output", help="adapter folder (default: a temporary folder)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as work:
        if args.tiny:
            quantized, samples = _tiny_quantized(work, seq_len=32)
        else:
            quantized, tokenizer = _real_quantized(args, work)
            samples = build_calibration_set(
                "wiki-vital", tokenizer, num_samples=args.samples, seq_len=args.seq_len, seed=1234
            )
        model = AutoModelForCausalLM.from_pretrained(quantized)
        lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear")
        peft_model = get_peft_model(model, lora, train_bias=args.train_bias)
        print(f"trainable parameters: {trainable_summary(peft_model)}")
        packed = {n: b.clone() for n, b in peft_model.named_buffers() if n.rsplit(".", 1)[-1] in ("qweight", "scales")}

        trainer = Trainer(
            model=peft_model,
            args=TrainingArguments(
                output_dir=os.path.join(work, "trainer"),
                max_steps=args.steps,
                per_device_train_batch_size=4,
                learning_rate=args.lr or (1e-2 if args.tiny else 2e-4),
                lr_scheduler_type="constant",
                logging_steps=1,
                save_strategy="no",
                report_to="none",
                use_cpu=True,
                disable_tqdm=True,
            ),
            train_dataset=_Windows(samples),
        )
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        print(f"loss: first {losses[0]:.3f}, last {losses[-1]:.3f} ({len(losses)} steps)")
        frozen = all(torch.equal(b, dict(peft_model.named_buffers())[n]) for n, b in packed.items())
        print(f"packed quantized weights unchanged: {frozen}")

        output = args.output or os.path.join(work, "adapter")
        peft_model.save_pretrained(output)
        probe = samples[0]["input_ids"][:, :16]
        peft_model.eval()
        with torch.no_grad():
            expected = peft_model(probe).logits
            reloaded = load_adapter(AutoModelForCausalLM.from_pretrained(quantized), output)
            same = torch.allclose(reloaded(probe).logits, expected, atol=1e-5)
        print(f"adapter saved to {output}; reloaded onto a fresh BC model, logits match: {same}")
        layers = sum(isinstance(m, QuantLinear) for m in reloaded.modules())
        return {"losses": losses, "frozen": frozen, "reload_matches": same, "quantized_layers": layers}


if __name__ == "__main__":
    main()
