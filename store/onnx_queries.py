"""Questions embedded with ONNX Runtime: the same model, exported once from its torch weights.

Why not sentence-transformers' own `backend="onnx"`: it needs `optimum`, whose releases pin
transformers below the version sentence-transformers 6 requires. Here the export is
torch's own (`torch.onnx.export`), checked against the torch model before first use.

Measured here (one short question, 1 thread): 6.4 ms with ONNX Runtime against 16.5 ms
with torch, the same vector (cosine 1.0000). Passages stay on torch: in batches the
two are within 20 %, and ingestion should not depend on an export.

By default questions go through an int8 copy of the export (`quantize`): with one short
question the fp32 model is bound by reading its 42 MB of layer weights, and int8 weights
are a quarter of that. Measured on this 2-core VM: 5.3 ms against 10.6 ms a question,
cosine 0.987-0.999 to torch's vector, and retrieval quality within noise (docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Bump when the export below changes, so old cached files are not reused.
EXPORT_VERSION = 2
# Texts that every exported model must embed as torch does before it is trusted.
PROBES = [
    "How is data stored in milvus?",
    "What is the maximum dataset size Milvus can handle, and how do I scale it out?",
    "rag ingest --prune docs/",
]
MIN_COSINE = 0.9999
# The int8 copy rounds every weight and activation: measured 0.987-0.999 on the probes and
# the dev questions. A broken quantization lands far below this.
MIN_COSINE_INT8 = 0.98


def supported(model_dir: Path) -> bool:
    """True for mean-pooled, normalized sentence-transformers models (what this encoder does)."""
    try:
        modules = json.loads((model_dir / "modules.json").read_text())
        pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    except (OSError, ValueError):
        return False
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    # sentence-transformers before 6 wrote `pooling_mode_mean_tokens`; 6 writes `pooling_mode`
    # (a model `rag tune` saved).
    mean = bool(pooling.get("pooling_mode_mean_tokens")) or pooling.get("pooling_mode") == "mean"
    return kinds == ["Transformer", "Pooling", "Normalize"] and mean


def cache_path(model_dir: Path, cache_dir: Path) -> Path:
    """Where the export of this model's weights lives, named after the weights' content.

    By content, not by path and mtime: every fresh install of the model package (a new venv,
    a CI clone) would otherwise export 90 MB again under a new name. The size and the first
    and last MiB tell weights apart without reading them all.
    """
    weights = model_dir / "model.safetensors"
    size = weights.stat().st_size
    digest = hashlib.sha256(f"{size}|{EXPORT_VERSION}".encode())
    with weights.open("rb") as data:
        digest.update(data.read(1 << 20))
        data.seek(max(size - (1 << 20), 0))
        digest.update(data.read(1 << 20))
    return cache_dir / f"{model_dir.name}-{digest.hexdigest()[:16]}.onnx"


def int8_path(export_file: Path) -> Path:
    """Where the int8 copy of an export lives."""
    return export_file.with_name(f"{export_file.stem}-int8.onnx")


def max_tokens(model_dir: Path) -> int:
    """The model's input limit, as sentence-transformers truncates."""
    try:
        config = json.loads((model_dir / "sentence_bert_config.json").read_text())
        return int(config["max_seq_length"])
    except (OSError, ValueError, KeyError):
        pass
    try:
        # sentence-transformers 6 saves the limit as the tokenizer's.
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
        return min(int(config["model_max_length"]), 512)
    except (OSError, ValueError, KeyError):
        return 256


class OnnxQueryEncoder:
    """Mean-pooled, normalized embeddings of questions from an ONNX export of the model."""

    def __init__(self, onnx_file: Path, model_dir: Path, threads: int = 1, int8: bool = False) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        options = onnxruntime.SessionOptions()
        # One thread, as for torch queries: concurrent questions are batched instead.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(onnx_file), options, providers=["CPUExecutionProvider"]
        )
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=max_tokens(model_dir))
        self.tokenizer.enable_padding()
        self._lock = threading.Lock()
        self.int8 = int8  # whether the weights are the int8 copy (see quantize)

    def encode_queries(self, texts: list[str]) -> Any:
        """One normalized vector per text (a numpy array)."""
        import numpy as np

        if self.int8 and len(texts) > 1:
            # Dynamic quantization scales activations over the whole input, padding and
            # batch-mates included: batched, a question's vector would depend on the load.
            # One at a time costs nothing here (16 questions: 106 ms against 174 batched).
            return np.concatenate([self.encode_queries([text]) for text in texts])
        with self._lock:  # the tokenizer's padding settings are shared state
            encoded = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        (hidden,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask})
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def export(transformer: Any, tokenizer_dir: Path, target: Path) -> None:
    """Write the torch transformer to `target` as ONNX (atomically: workers may race)."""
    import torch
    from tokenizers import Tokenizer

    class LastHiddenState(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    sample = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode(PROBES[0])
    ids = torch.tensor([sample.ids])
    mask = torch.tensor([sample.attention_mask])
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".onnx.tmp")
    os.close(handle)
    try:
        # The tracer warns about every shape-dependent branch it freezes; the probe check
        # in load_or_export is what tells whether the export is right.
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                LastHiddenState(transformer.eval()),
                (ids, mask),
                temporary,
                input_names=["input_ids", "attention_mask"],
                output_names=["last_hidden_state"],
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "tokens"},
                    "attention_mask": {0: "batch", 1: "tokens"},
                    "last_hidden_state": {0: "batch", 1: "tokens"},
                },
                opset_version=17,
                dynamo=False,
            )
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide it from other users' workers
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)


def quantize(source: Path, target: Path) -> None:
    """Write an int8 copy of the export: MatMul weights per output channel, activations
    scaled per question at run time (ONNX Runtime's dynamic quantization). Atomic."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".onnx.tmp")
    os.close(handle)
    root = logging.getLogger()
    quiet = _DropMessages("pre-processing before quantization")  # advice for static quantization
    root.addFilter(quiet)
    try:
        quantize_dynamic(
            source,
            temporary,
            per_channel=True,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            # The tracer's MatMul outputs carry no type annotations; they are all float.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    finally:
        root.removeFilter(quiet)
        Path(temporary).unlink(missing_ok=True)


class _DropMessages(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def agrees(
    encoder: OnnxQueryEncoder,
    reference: Callable[[list[str]], Sequence[Sequence[float]]],
    min_cosine: float = MIN_COSINE,
) -> bool:
    """Whether the encoder's vectors match the reference's on the probe texts."""
    import numpy as np

    ours = np.asarray(encoder.encode_queries(PROBES), dtype=np.float64)
    theirs = np.asarray(reference(PROBES), dtype=np.float64)
    theirs = theirs / np.linalg.norm(theirs, axis=1, keepdims=True)
    return ours.shape == theirs.shape and float((ours * theirs).sum(axis=1).min()) >= min_cosine


def load_or_export(
    model_dir: Path,
    cache_dir: Path,
    transformer: Callable[[], Any],
    reference: Callable[[list[str]], Sequence[Sequence[float]]],
    int8: bool = False,
) -> OnnxQueryEncoder | None:
    """The ONNX encoder for this model: from the cache, else exported and checked first.

    With `int8`, its int8 copy, made and checked the same way; if that fails, the fp32
    export. None (the caller keeps torch) when the model's pooling is not supported,
    onnxruntime is missing, the cache can't be written, or the export disagrees with torch.
    """
    if not supported(model_dir):
        return None
    try:
        exact_file = cache_path(model_dir, cache_dir)
        int8_file = int8_path(exact_file)
        if int8 and int8_file.is_file():
            # The usual start: only the copy in use is opened, not the 90 MB export too.
            return OnnxQueryEncoder(int8_file, model_dir, int8=True)
        exact = _open_or_make(
            exact_file, model_dir, lambda: export(transformer(), model_dir, exact_file), reference, MIN_COSINE
        )
    except Exception as exc:  # any failure here only costs speed
        log.warning("questions stay on torch: ONNX export unavailable (%s)", exc)
        return None
    if exact is None:
        log.warning("questions stay on torch: the ONNX export disagrees with the model")
        return None
    if not int8:
        return exact
    try:
        quantized = _open_or_make(
            int8_file,
            model_dir,
            lambda: quantize(exact_file, int8_file),
            reference,
            MIN_COSINE_INT8,
            int8=True,
        )
    except Exception as exc:
        log.warning("questions use the fp32 ONNX export: int8 quantization failed (%s)", exc)
        return exact
    if quantized is None:
        log.warning("questions use the fp32 ONNX export: its int8 copy disagrees with the model")
        return exact
    return quantized


def _open_or_make(
    target: Path,
    model_dir: Path,
    make: Callable[[], None],
    reference: Callable[[list[str]], Sequence[Sequence[float]]],
    min_cosine: float,
    int8: bool = False,
) -> OnnxQueryEncoder | None:
    """The encoder in `target`; if the file is missing, made and checked against `reference`
    first (a cached file was checked when it was made). None, and the file deleted, when a
    new one disagrees."""
    if target.is_file():
        return OnnxQueryEncoder(target, model_dir, int8=int8)
    make()
    encoder = OnnxQueryEncoder(target, model_dir, int8=int8)
    if agrees(encoder, reference, min_cosine):
        return encoder
    target.unlink(missing_ok=True)
    return None
