"""Extra RAM and time of building calibration windows from a large local text file.

Writes a text file of ``--mb`` megabytes (the wiki-vital articles, shuffled differently in every copy, so it is real
prose and no copy repeats the previous one) and builds ``--num-samples`` windows of ``--seq-len`` tokens from it with
``optimum_bc.data.build_calibration_set`` and the SmolLM2 tokenizer (the packaged model's; a BPE tokenizer trained
on the text when it is not installed), in a child process per run so the peaks do not mix:

* ``streamed``: the default for a text above ``optimum_bc.data.STREAM_THRESHOLD`` (read and tokenized span by span);
* ``whole`` (with ``--whole-mb``): the same text cut to that size, tokenized whole (the threshold raised above it),
  the way every text was calibrated before: shows the per-character cost the streaming avoids.

Prints, per run, the extra peak RSS over the child's RSS after imports (``VmHWM`` reset through
``/proc/self/clear_refs``, Linux), the time, and the
bytes of extra RSS per character of text. Target: a 500 MB file calibrates in under 1 GB of extra RSS.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/calibration_memory.py [--mb 500] [--whole-mb 20] [--tmp /tmp]``
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time


def write_text(path: str, megabytes: int) -> int:
    """Write about ``megabytes`` MB of wiki-vital prose to ``path``; returns its size in bytes."""
    from optimum_bc.data.calibration_data import DOC_SEPARATOR, wiki_vital_articles

    articles = list(wiki_vital_articles("calibration").values())
    rng = random.Random(0)
    target = megabytes * 1_000_000
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < target:
            rng.shuffle(articles)
            f.write(DOC_SEPARATOR.join(articles) + DOC_SEPARATOR)
    return os.path.getsize(path)


def load_tokenizer(text_path: str):  # noqa: ANN201 - a transformers tokenizer
    try:
        from transformers import AutoTokenizer

        from optimum_bc.data.packaged import packaged_model_dir

        return AutoTokenizer.from_pretrained(packaged_model_dir()), "SmolLM2"
    except Exception:  # noqa: BLE001 - fall back to a tokenizer trained here
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        with open(text_path, encoding="utf-8") as f:
            sample = f.read(5_000_000)
        backend = Tokenizer(models.BPE(unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel()
        backend.train_from_iterator([sample], trainer=trainers.BpeTrainer(vocab_size=8000, special_tokens=["[UNK]"]))
        return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]"), "BPE-8k (trained)"


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> int:
    """Reset the peak RSS (VmHWM) to the current RSS, so loading the tokenizer does not count; returns it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def child(path: str, mode: str, num_samples: int, seq_len: int) -> None:
    import torch

    from optimum_bc.data import calibration_data as data

    assert hasattr(data, "STREAM_THRESHOLD"), f"{data.__file__} is an optimum_bc without streamed calibration"

    torch.set_num_threads(1)
    tokenizer, name = load_tokenizer(path)
    tokenizer("warm up", add_special_tokens=False)
    before = _reset_peak()
    if mode == "whole":
        data.STREAM_THRESHOLD = os.path.getsize(path) + 1
    start = time.perf_counter()
    samples = data.build_calibration_set(path, tokenizer, num_samples=num_samples, seq_len=seq_len, seed=0)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    assert len(samples) == num_samples and samples[0]["input_ids"].shape == (1, seq_len)
    print(json.dumps({"tokenizer": name, "extra_rss": peak - before, "seconds": seconds}))


def run(path: str, mode: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", path, mode, str(args.num_samples), str(args.seq_len)]
    # The child must import this checkout's optimum_bc, not an installed copy (a script's sys.path starts at
    # benchmarks/, not at the repository root).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    size = os.path.getsize(path)
    print(
        f"{mode:>8}: {size / 1e6:7.1f} MB text, {args.num_samples} x {args.seq_len} tokens ({result['tokenizer']}): "
        f"extra RSS {result['extra_rss'] / 2**20:8.1f} MiB ({result['extra_rss'] / size:6.1f} B/char), "
        f"{result['seconds']:6.1f} s",
        flush=True,
    )
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=500, help="size of the streamed text file (500 MB)")
    parser.add_argument("--whole-mb", type=int, default=20, help="size of the text tokenized whole (20 MB; 0: skip)")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="optimum-bc-calib-") as folder:
        big = os.path.join(folder, "big.txt")
        write_text(big, args.mb)
        streamed = run(big, "streamed", args)
        if args.whole_mb:
            small = os.path.join(folder, "small.txt")
            write_text(small, args.whole_mb)
            run(small, "whole", args)
    ok = streamed["extra_rss"] < 2**30
    print(f"target: {args.mb} MB text under 1 GiB extra RSS: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
