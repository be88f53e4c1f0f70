"""Re-export a model folder of lstmd's own model with this version's serving graph.

``lstmd-export onnx`` keeps the PyTorch parameters in the graph as they are (no constant
folding), named after the module that held them (``lm.embedding.weight``, ``lm.lstm.*``,
``lm.decoder.*``). So an ``LSTMLanguageModel`` can be rebuilt from its own ``model.onnx``, with
the very weights it was trained to, and exported again when the serving graph improves (the
bundled model got its two-dimensional decoder this way: docs/runtime.md). The new graph is
verified against the rebuilt PyTorch model and checked as lstmd-server loads it before it
replaces the old one; the card keeps everything but the checksum and the verification figures.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from lstmd.export.errors import ExportError
from lstmd.export.model import LSTMLanguageModel, ModelConfig
from lstmd.export.onnx_export import export_onnx
from lstmd.export.publish import check_servable, staged
from lstmd.export.verify import verify
from lstmd.model.folder import ONNX_FILE, read_model_dir, sha256_file, write_card

PREFIX = "lm."  # onnx_export.ServingGraph holds the language model as ``lm``


class ReexportError(ExportError):
    """The graph is not one of lstmd's own model, or its re-export fails a check."""


def model_from_onnx(path: Path) -> LSTMLanguageModel:
    """The ``LSTMLanguageModel`` whose export ``path`` is, with its weights, in eval mode. Raises
    ReexportError for a graph of another model."""
    import onnx
    import torch
    from onnx import numpy_helper

    weights = {
        t.name.removeprefix(PREFIX): torch.from_numpy(numpy_helper.to_array(t).copy())
        for t in onnx.load(str(path)).graph.initializer
        if t.name.startswith(PREFIX)
    }
    layers = {int(m.group(1)) for name in weights if (m := re.fullmatch(r"lstm\.weight_ih_l(\d+)", name))}
    if "embedding.weight" not in weights or not layers:
        raise ReexportError(f"{path}: not an export of lstmd's LSTMLanguageModel (no lm.embedding / lm.lstm weights)")
    vocab_size, embed_size = weights["embedding.weight"].shape
    hidden_size = weights["lstm.weight_hh_l0"].shape[1]
    tied = "decoder.weight" not in weights
    config = ModelConfig(vocab_size, embed_size, hidden_size, len(layers), tie_weights=tied)
    lm = LSTMLanguageModel(config)
    expected = set(lm.state_dict()) - ({"decoder.weight"} if tied else set())
    if set(weights) != expected:
        raise ReexportError(f"{path}: its weights {sorted(weights)} are not LSTMLanguageModel's {sorted(expected)}")
    lm.load_state_dict(weights, strict=False)  # a tied decoder.weight is embedding.weight, loaded with it
    return lm.eval()


def reexport_model_dir(folder: Path, real_ids: list[int] | None = None, tolerance: float = 1e-4) -> dict[str, float]:
    """Replace ``folder``'s graph with a new export of the model rebuilt from it, verified against
    that model (parity on ``real_ids`` among the rest, lstmd.export.verify) and checked as
    lstmd-server loads it; only then does the new folder take the old one's place. Returns the
    verification figures, which the card records. Raises ReexportError or PublishError."""
    card, tokenizer = read_model_dir(folder)
    if card.precision != "fp32":
        raise ReexportError(f"{folder}: a {card.precision} model; re-export its fp32 model and quantize that")
    lm = model_from_onnx(folder / ONNX_FILE)
    with staged(folder, replace=True) as work:
        for item in folder.iterdir():
            if item.is_file() and item.name != ONNX_FILE:
                shutil.copy2(item, work / item.name)
        export_onnx(lm, len(tokenizer), work / ONNX_FILE)
        try:
            parity = verify(lm, work, len(tokenizer), real_ids, tolerance)
        except ExportError as e:
            raise ReexportError(f"the re-export of {folder} fails verification: {e}") from e
        card.sha256 = sha256_file(work / ONNX_FILE)
        card.verification = {**card.verification, "max_abs_difference": parity, "tolerance": tolerance}
        write_card(work, card)
        check_servable(work, folder.resolve().parent.name)
    return parity
