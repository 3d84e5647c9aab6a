"""A demo generative model: a tiny Llama with random weights and a tokenizer trained here.

Nothing is downloaded from a hub. :func:`build` trains a byte-level BPE tokenizer on a
few kilobytes of text (``tokenizers``), wraps it with a chat template, makes a
``LlamaForCausalLM`` from a fixed seed and saves the directory a Hugging Face model has
(``config.json``, ``model.safetensors``, the tokenizer files), then writes its
``SHA256SUMS`` manifest and returns the digest a ModelDeployment names in
``spec.model.sha256``. vLLM serves it like any other Llama; the tests, ``make run`` and
the benchmarks use it::

    python -m modelyard.runtime.llmdemo /tmp/tiny/1      # prints the digest

It needs ``transformers`` and ``tokenizers`` (vLLM's environment has both). vLLM's CPU
attention needs a head size of at least 32: hidden 128 over 4 heads.

``slow_down`` makes a version that answers the same but later (more, wider layers), for
rollouts that must catch a slower version; ``corrupt`` a version whose weights vLLM
refuses to load while its manifest is self-consistent (the engine's error is the reason).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from modelyard.runtime import modeldir

__all__ = ["build", "corrupted_copy"]

_TEXT = (
    "The quick brown fox jumps over the lazy dog. Models serve answers to questions about "
    "the world. Hello, how are you today? I am fine, thank you. A canary goes first, and "
    "the stable version keeps serving while it is judged. Tokens stream one at a time. "
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build(dest: Path, *, seed: int = 0, layers: int = 2, hidden: int = 128,
          corrupt: bool = False) -> str:
    """Write the model directory at ``dest``; return its manifest digest."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([_TEXT] * 40, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>",
                                      eos_token="</s>", unk_token="<unk>")
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(dest)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(wrapped), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False, torch_dtype="float32")
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(dest, safe_serialization=True)
    if corrupt:
        _corrupt(dest / "model.safetensors")
    return modeldir.write_manifest(dest)


def corrupted_copy(source: Path, dest: Path) -> str:
    """A copy of the model at ``source`` whose weights vLLM refuses while its manifest is
    self-consistent (only the engine can tell); its digest. No torch needed."""
    shutil.copytree(source, dest)
    (dest / modeldir.MANIFEST).unlink(missing_ok=True)
    _corrupt(dest / "model.safetensors")
    return modeldir.write_manifest(dest)


def _corrupt(weights: Path) -> None:
    """Keep the safetensors header, declare one tensor with a wrong shape: vLLM refuses it
    when it loads the weights, after the engine has started."""
    raw = weights.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    name = next(k for k in header if k.endswith("embed_tokens.weight"))
    rows, cols = header[name]["shape"]
    header[name]["shape"] = [rows // 2, cols * 2 + 1]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    weights.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--corrupt", action="store_true")
    args = parser.parse_args(argv)
    print(build(args.dest, seed=args.seed, layers=args.layers, hidden=args.hidden,
                corrupt=args.corrupt))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
