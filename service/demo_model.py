"""Build a tiny random-weight Llama, its tokenizer and N LoRA adapters, locally (no model hub).

Used by the local demo and the integration tests: the model is small enough for
vLLM's CPU build to serve in a second, and each adapter shifts the outputs so
that base and adapter answers differ. Needs the ``engine-cpu`` extra.
"""

from __future__ import annotations

import glob
import json
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def _corpus_files(limit: int = 400) -> list[str]:
    stdlib = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")))
    licenses = sorted(glob.glob("/usr/share/common-licenses/*"))
    return [f for f in (stdlib + licenses) if Path(f).is_file()][:limit]


def build_tokenizer(out: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train(_corpus_files(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_demo_model(out_dir: Path, adapters: int = 2, seed: int = 0, vocab_size: int = 2000) -> dict:
    """Writes ``out_dir/base`` and ``out_dir/adapters/a1..aN``; returns their paths."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir).resolve()
    base_dir = out_dir / "base"
    base_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(base_dir, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(base_dir, safe_serialization=True)

    adapter_dirs = []
    for index in range(1, adapters + 1):
        torch.manual_seed(seed + index)
        peft_model = get_peft_model(
            LlamaForCausalLM.from_pretrained(base_dir),
            LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        )
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn_like(param) * 0.5)
        adapter_dir = out_dir / "adapters" / f"a{index}"
        peft_model.save_pretrained(adapter_dir)
        # vLLM reads base_model_name_or_path only for display; point it at the local base.
        cfg_path = adapter_dir / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = str(base_dir)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        adapter_dirs.append(adapter_dir)
    manifest = {"base": str(base_dir), "adapters": {d.name: str(d) for d in adapter_dirs}}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def demo_model_ready(out_dir: Path, adapters: int = 2) -> bool:
    out_dir = Path(out_dir)
    return (out_dir / "manifest.json").exists() and all(
        (out_dir / "adapters" / f"a{i}" / "adapter_model.safetensors").exists() for i in range(1, adapters + 1)
    )
