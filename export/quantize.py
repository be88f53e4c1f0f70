"""int8 dynamic quantization of a model folder, with its perplexity and speed change measured."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lstmd.export.verify import ort_perplexity, ort_speed
from lstmd.model import graph
from lstmd.model.folder import CARD_FILE, ONNX_FILE, ModelCard, read_model_dir, sha256_file, write_card


def quantize_model_dir(src: Path, dst: Path, test_ids: list[int]) -> dict[str, Any]:
    """Write ``dst``: ``src`` with int8 weights. Returns fp32-vs-int8 perplexity and step times."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    card, _ = read_model_dir(src)
    dst.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(str(src / ONNX_FILE), str(dst / ONNX_FILE), weight_type=QuantType.QInt8)
    tokenizer_file = card.tokenizer_spec.path
    shutil.copy(src / tokenizer_file, dst / tokenizer_file)
    layers, hidden = card.num_layers, card.hidden_size
    results: dict[str, Any] = {"perplexity_test": {}, "step_ms_median": {}, "size_mb": {}}
    for precision, folder in (("fp32", src), ("int8", dst)):
        session = graph.load(folder / ONNX_FILE)
        results["perplexity_test"][precision] = round(ort_perplexity(session, test_ids, layers, hidden), 2)
        results["step_ms_median"][precision] = {b: round(ort_speed(session, layers, hidden, b), 3) for b in (1, 64)}
        results["size_mb"][precision] = round((folder / ONNX_FILE).stat().st_size / 1e6, 2)
    int8 = ModelCard.from_json((src / CARD_FILE).read_text())
    int8.name, int8.precision, int8.sha256 = dst.parent.name, "int8", sha256_file(dst / ONNX_FILE)
    int8.quantization = results
    write_card(dst, int8)
    return results
