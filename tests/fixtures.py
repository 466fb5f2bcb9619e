"""Test fixtures that build models in-process: a tiny GPT-2 with a byte-level BPE tokenizer (no hub)."""

from __future__ import annotations

from typing import Any

import torch

_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog.
A good answer is short, kind and true.
The cat sat on the mat and looked at the moon.
How are you today? I am fine, thank you.
Please tell me a story about a dragon and a knight.
The weather is nice and the sun is shining.
What is the capital of France? The capital of France is Paris.
Water boils at one hundred degrees.
She reads a book every night before she sleeps.
We walked along the river and talked about the future.
Human: Can you help me write a poem? Assistant: Of course, here is a poem about the sea.
Human: What is two plus two? Assistant: Two plus two is four.
The small robot learned to count, to read and to write.
Every morning the baker makes fresh bread for the town.
Music, art and science make the world a better place.
I think that you should drink more water and sleep well.
The train leaves the station at nine in the evening.
Thank you for asking. That is a very good question.
Birds sing in the trees while children play in the park.
He said that the answer was in the old red box.
"""


def tiny_causal_lm(
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 32,
    n_positions: int = 128,
    text: list[str] | None = None,
) -> tuple[Any, Any]:
    """A tiny randomly initialised GPT-2 and a byte-level BPE tokenizer (vocab ~300), built offline.

    Special tokens ``<pad>``, ``<eos>`` (also BOS), ``<unk>``; pad != eos; ``padding_side="left"``.
    Dropout is 0 so forward passes are deterministic. Returns ``(model, tokenizer)``; the model is in
    eval mode and float32 on CPU.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    corpus = text if text is not None else _TINY_CORPUS.splitlines()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        bos_token="<eos>",
        padding_side="left",
        model_max_length=n_positions,
    )
    config = GPT2Config(
        vocab_size=len(hf_tok),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=max(1, n_embd // 16),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    model.generation_config.eos_token_id = hf_tok.eos_token_id
    model.eval()
    return model, hf_tok


def tiny_llama_lm(tokenizer: Any, seed: int = 0, hidden: int = 32) -> Any:
    """A tiny randomly initialised Llama (RoPE, RMSNorm, grouped-query attention, untied head) for
    ``tokenizer`` (e.g. the one of :func:`tiny_causal_lm`); eval mode, float32 on CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return model
