"""Helpers for tests, benchmarks and the demo: tiny random Hugging Face models built from configs in
code (no hub), and real peft LoRA adapters written with ``save_pretrained``.
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field

import torch

__all__ = ["AdapterSpec", "tiny_model", "tiny_tokenizer", "write_peft_adapters", "peft_multi",
           "FAMILIES", "TARGETS"]

FAMILIES = ("llama", "qwen2", "mistral", "phi3", "gpt2")

# module names each family's adapters may target
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def tiny_model(family: str = "llama", *, hidden: int = 64, layers: int = 2, vocab: int = 128,
               intermediate: int | None = None, heads: int = 4, kv_heads: int = 2, seed: int = 0,
               dtype=torch.float32, init_range: float = 0.02):
    """A small random causal LM of the given family, in eval mode. ``init_range`` is the weights'
    std (larger: spread-out logits, fewer near-ties between top tokens)."""
    import transformers as tf

    torch.manual_seed(seed)
    inter = intermediate or hidden * 3 // 2 + 2
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                  num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=256,
                  initializer_range=init_range)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=None))
    elif family == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    elif family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers,
                                                 n_head=heads, n_positions=256,
                                                 initializer_range=init_range,
                                                 bos_token_id=1, eos_token_id=2))
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return model.to(dtype).eval()


CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant : {% endif %}")


def tiny_tokenizer(vocab: int = 128, padding_side: str = "left"):
    """A word-level fast tokenizer built in code (no hub) for :func:`tiny_model`'s vocabulary:
    ids 0-3 are ``<pad> <s> </s> <unk>`` (the tiny Llama's pad / bos / eos), the rest lower-case
    words (``w4`` ... plus a few English ones); splits on whitespace and punctuation, with a small
    chat template. ``padding_side`` left, as decoder-only generation needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", "system", ":", "?", ".", ",",
             "!", "the", "a", "is", "of", "what", "add", "sort", "upper", "reverse", "hello",
             "world", "list", "numbers", "and", "to", "in", "one", "two", "three", "four"]
    words += [f"w{i}" for i in range(len(words), vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words[:vocab])},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                eos_token="</s>", unk_token="<unk>", padding_side=padding_side)
    t.chat_template = CHAT_TEMPLATE
    return t


@dataclass
class AdapterSpec:
    """One adapter to write: rank, alpha, targets (None: every target of the family), rsLoRA."""

    name: str
    r: int = 8
    alpha: float | None = None
    targets: list | None = None
    rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    seed: int = 0


def write_peft_adapters(model, specs, folder: str, family: str = "llama") -> dict[str, str]:
    """Write each spec as a real peft adapter (``init_lora_weights=False``: random, nonzero B) with
    ``save_pretrained``; returns ``{name: folder}``. ``model`` is left untouched."""
    from peft import LoraConfig, get_peft_model

    dirs = {}
    for spec in specs:
        torch.manual_seed(spec.seed)
        cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha if spec.alpha is not None else 2 * spec.r,
                         target_modules=spec.targets or TARGETS[family], init_lora_weights=False,
                         use_rslora=spec.rslora, rank_pattern=spec.rank_pattern,
                         fan_in_fan_out=(family == "gpt2"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(copy.deepcopy(model), cfg)
            path = os.path.join(folder, spec.name)
            pm.save_pretrained(path)
        dirs[spec.name] = path
    return dirs


def peft_multi(model, dirs: dict[str, str]):
    """A peft PeftModel over a copy of ``model`` with every adapter loaded (for parity checks)."""
    from peft import PeftModel

    names = list(dirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(copy.deepcopy(model), dirs[names[0]], adapter_name=names[0])
        for n in names[1:]:
            pm.load_adapter(dirs[n], adapter_name=n)
    return pm.eval()
