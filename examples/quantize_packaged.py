"""Quantize the packaged SmolLM2-135M offline with GPTQ + bias compensation, save it, reload it, compare.

Run: python examples/quantize_packaged.py --bits 4 --num-samples 16 --output /tmp/smollm2-bc
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_bc  # noqa: F401  (registers quant_method "bc")
from optimum_bc import BCQuantizationConfig
from optimum_bc.data.evaluation import evaluate_perplexity
from optimum_bc.data.packaged import packaged_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--output", default="smollm2-135m-bc")
    args = parser.parse_args()

    path = packaged_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = BCQuantizationConfig(
        bits=args.bits,
        group_size=args.group_size,
        method=args.method,
        dataset="wiki-vital",
        tokenizer=tokenizer,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        batch_size=4,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)
    print(model.quantization_report.format_table())
    ppl = evaluate_perplexity(model, tokenizer, "wiki-vital", seq_len=args.seq_len, max_samples=args.eval_windows)
    print(f"perplexity (wiki-vital held-out, {args.eval_windows} x {args.seq_len} tokens): {ppl:.2f}")
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    reloaded = AutoModelForCausalLM.from_pretrained(args.output)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    same = torch.equal(reloaded(ids).logits, model(ids).logits)
    print(f"saved to {args.output}; reloaded logits identical: {same}")


if __name__ == "__main__":
    main()
