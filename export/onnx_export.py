"""Export any PyTorch LSTM language model to the lstmd ONNX model format.

The model must follow one interface (ours does, ``lstmd.export.model``):

    forward(tokens, (h, c)) -> (logits, (h, c))

with ``tokens`` (batch, time) int64, ``h`` / ``c`` (layers, batch, hidden) and ``logits``
(batch, time, vocab). A model with another interface, such as pytorch/examples'
``word_language_model`` RNNModel (time-major, flattened log-softmax), exports through an adapter
of ``lstmd.export.adapters``. ``export_onnx`` first runs the model on a small batch and names
any difference from the interface (``lstmd.export.interface``). The state size is read from the
module's ``num_layers`` and ``hidden_size`` attributes, or else from its first ``nn.LSTM``. A
model may also define
``forward_last(tokens, (h, c)) -> (logits of the last step (batch, vocab), (h, c))``: the graph
then runs the decoder on the last step only, which makes prompts several times cheaper.

The exported graph adds the post-processing the server needs: log-softmax of the last step
and its top-k (in the graph: ONNX Runtime's TopK beats NumPy's argpartition several times over,
see bench/postprocessing.py), and returns the new state. Per-step log-probabilities are left
out: ONNX Runtime computes every output of a graph on each call, so they would multiply the
decoder's cost of every prompt by its length; the server scores text step by step instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lstmd.export.interface import ModelInterfaceError, check_forward
from lstmd.export.model import LSTMLanguageModel, ModelConfig
from lstmd.model.folder import ONNX_FILE, ModelCard, open_tokenizer, sha256_file, write_card
from lstmd.model.graph import INPUTS, OUTPUTS
from lstmd.model.tokenizer import TokenizerSpec, Vocab

OPSET = 17


class ServingGraph(nn.Module):
    """Wraps a language model into the graph the server runs."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(
        self, tokens: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, top_k: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        forward_last = getattr(self.lm, "forward_last", None)
        if callable(forward_last):
            last, (h1, c1) = forward_last(tokens, (h0, c0))  # (batch, vocab)
        else:
            logits, (h1, c1) = self.lm(tokens, (h0, c0))  # (batch, time, vocab)
            last = logits[:, -1]
        logprobs = torch.log_softmax(last, dim=-1)  # (batch, vocab)
        top_logprobs, top_ids = torch.topk(logprobs, top_k)  # type: ignore[arg-type]  # traced as a dynamic k
        return logprobs, top_logprobs, top_ids, h1, c1


def state_shape(lm: nn.Module) -> tuple[int, int]:
    """(layers, hidden) of a language model's LSTM state."""
    layers, hidden = getattr(lm, "num_layers", None), getattr(lm, "hidden_size", None)
    if isinstance(layers, int) and isinstance(hidden, int):
        return layers, hidden
    for module in lm.modules():
        if isinstance(module, nn.LSTM):
            if module.bidirectional or module.proj_size:
                raise ModelInterfaceError("only unidirectional LSTMs without projections can stream state")
            return module.num_layers, module.hidden_size
    raise ModelInterfaceError(
        f"{type(lm).__name__}: cannot find the state size: give the module num_layers and hidden_size attributes"
    )


def _import_class(spec: str) -> type[nn.Module]:
    """``package.module:Class`` or ``path/to/file.py:Class``."""
    target, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--model-class {spec!r}: expected module:Class or file.py:Class")
    if target.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"cannot import {target}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        # the file's folder is on the path while it runs, so it can import the modules beside it
        # (``from model import RNNModel``), as it could when run as a script from there
        folder = str(Path(target).resolve().parent)
        sys.path.insert(0, folder)
        try:
            module_spec.loader.exec_module(module)
        finally:
            sys.path.remove(folder)
    else:
        module = importlib.import_module(target)
    cls = getattr(module, name)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{spec} is not a torch.nn.Module class")
    return cls


def load_torch_model(
    checkpoint: str | Path, model_class: str | None = None, model_kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """Load a language model for export, in eval mode.

    - ``model_class`` given: instantiate it with ``model_kwargs`` and load the checkpoint's
      state dict (the checkpoint may be a state dict or hold one under "model" or "state_dict").
    - otherwise the checkpoint is a whole pickled module, or one of ``lstmd-export train``'s.
    """
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if model_class:
        lm = _import_class(model_class)(**(model_kwargs or {}))
        state = ckpt
        if isinstance(ckpt, dict):
            state = ckpt.get("model", ckpt.get("state_dict", ckpt))
        lm.load_state_dict(state)
    elif isinstance(ckpt, nn.Module):
        lm = ckpt
    elif isinstance(ckpt, dict) and "config" in ckpt and "model" in ckpt:
        lm = LSTMLanguageModel(ModelConfig(**ckpt["config"]))
        lm.load_state_dict(ckpt["model"])
    else:
        raise ValueError(f"{checkpoint}: not an lstmd checkpoint or a pickled module; pass --model-class")
    return lm.eval()


def export_onnx(lm: nn.Module, vocab_size: int, path: Path) -> None:
    """Write the serving graph of ``lm`` to ``path`` and check it with onnx.checker."""
    import onnx

    layers, hidden = state_shape(lm)
    check_forward(lm, vocab_size, layers, hidden)
    batch, time = 2, 3
    example = (
        torch.zeros(batch, time, dtype=torch.long),
        torch.zeros(layers, batch, hidden),
        torch.zeros(layers, batch, hidden),
        torch.tensor(min(5, vocab_size)),
    )
    state_axes = {1: "batch"}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated, but unlike the dynamo one it keeps the time axis
        # dynamic through slicing and maps nn.LSTM to ONNX's LSTM op; verification checks the result.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ServingGraph(lm).eval(),
            example,
            str(path),
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_axes={
                "tokens": {0: "batch", 1: "time"},
                "h0": state_axes,
                "c0": state_axes,
                "logprobs": {0: "batch"},
                "top_logprobs": {0: "batch", 1: "top_k"},
                "top_ids": {0: "batch", 1: "top_k"},
                "h1": state_axes,
                "c1": state_axes,
            },
            opset_version=OPSET,
            # Folding would store a transposed copy of a tied embedding for the decoder (10 MB for
            # the bundled model); ONNX Runtime folds it in memory when it loads the model instead.
            do_constant_folding=False,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def write_model_dir(
    lm: nn.Module,
    vocab: Vocab | Path,
    folder: Path,
    name: str,
    version: str,
    training: dict[str, Any] | None = None,
    perplexity: dict[str, float] | None = None,
    tokenizer: TokenizerSpec | None = None,
) -> ModelCard:
    """Export ``lm`` with its tokenizer into a model folder and write its card.

    ``vocab`` is the tokenizer's vocabulary (saved as the spec's file) or its file (``vocab.txt``,
    ``tokenizer.json`` or a SentencePiece ``.model``, copied in as the spec's file); ``tokenizer``
    is the card's tokenizer section (None: lstmd's ``words``). Raises ModelFormatError when the
    tokenizer cannot be loaded. The folder is not checked as the server checks it: ``lstmd-export
    onnx`` does that before it publishes the folder (lstmd.export.publish)."""
    spec = tokenizer or TokenizerSpec()
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(vocab, Vocab):
        vocab.save(folder / spec.path)
    else:
        shutil.copyfile(vocab, folder / spec.path)
    size = len(open_tokenizer(folder, spec))
    export_onnx(lm, size, folder / ONNX_FILE)
    layers, hidden = state_shape(lm)
    card = ModelCard(
        name=name,
        version=version,
        vocab_size=size,
        num_layers=layers,
        hidden_size=hidden,
        sha256=sha256_file(folder / ONNX_FILE),
        architecture=f"{type(lm).__name__}: embedding -> {layers}-layer LSTM -> linear decoder",
        training=training or {},
        perplexity=perplexity or {},
        tokenizer=spec.to_dict(),
    )
    write_card(folder, card)
    return card


def read_report(path: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """Training facts and perplexities for the card, from ``lstmd-export train``'s report.json."""
    report = json.loads(path.read_text())
    ppl = {"valid": report["valid_ppl"], "test": report["test_ppl"]}
    baseline = report.get("baseline", {})
    if baseline:
        ppl["baseline_valid"] = baseline["valid_ppl"]
        ppl["baseline_test"] = baseline["test_ppl"]
    facts = {k: report[k] for k in ("corpus", "split", "tokens", "training_minutes", "machine", "parameters", "train")}
    facts["split_documents"] = report.get("split_documents", {})
    facts["baseline"] = {k: v for k, v in baseline.items() if not k.endswith("_ppl")}
    return facts, ppl
