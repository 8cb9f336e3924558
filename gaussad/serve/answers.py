"""Inspections as JSON answers: the service's own (`/v1`) and the Open Inference Protocol's (`/v2`).

Pictures use the library's colour scale (`gaussad.decisions.map_scale`, `gaussad.heatmaps.colorize`), as
`gaussad predict` draws them; a model without a pixel threshold scales each map to its own range.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from gaussad.decisions import map_scale
from gaussad.heatmaps import colorize
from gaussad.serve.audit import AuditRecord
from gaussad.serve.service import Inspection


def _png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decision_fields(record: AuditRecord) -> dict[str, Any]:
    """What every answer states about a decision, and the audit trail holds."""
    return {
        "request_id": record.request_id,
        "model": record.model,
        "model_sha256": record.model_sha256,
        "score": record.score,
        "normalized_score": record.normalized_score,
        "is_anomalous": record.is_anomalous,
        "image_threshold": record.image_threshold,
        "pixel_threshold": record.pixel_threshold,
        "image_sha256": record.image_sha256,
        "width": record.image_width,
        "height": record.image_height,
        "latency_ms": round(record.latency_ms, 3),
    }


def inspect_answer(inspection: Inspection) -> dict[str, Any]:
    """The `/v1/models/{name}/inspect` answer; with maps, the anomaly map and the defect mask as base64
    PNGs at the image's size (blocking: run it in a thread)."""
    answer = decision_fields(inspection.record)
    anomaly_map = inspection.anomaly_map
    if anomaly_map is not None:
        scale = map_scale(
            inspection.model.pixel_threshold, (float(anomaly_map.min()), float(anomaly_map.max()))
        )
        answer["anomaly_map"] = _png(colorize(anomaly_map, *scale))
        mask = inspection.defect_mask
        answer["defect_mask"] = None if mask is None else _png(mask.astype(np.uint8) * 255)
    return answer


def infer_outputs(inspections: list[Inspection], wanted: set[str] | None) -> list[dict[str, Any]]:
    """The `/v2/.../infer` outputs: one value per image for score, normalized_score and is_anomalous;
    anomaly_map (FP32, [N, H, W]) when asked for. `wanted` names the outputs requested (None: all)."""
    records = [inspection.record for inspection in inspections]
    count = [len(records)]
    outputs = [
        {"name": "score", "datatype": "FP64", "shape": count, "data": [r.score for r in records]},
        {
            "name": "normalized_score",
            "datatype": "FP64",
            "shape": count,
            "data": [r.normalized_score for r in records],
        },
        {
            "name": "is_anomalous",
            "datatype": "BOOL",
            "shape": count,
            "data": [r.is_anomalous for r in records],
        },
    ]
    maps = [inspection.anomaly_map for inspection in inspections]
    if all(m is not None for m in maps):
        outputs.append(
            {
                "name": "anomaly_map",
                "datatype": "FP32",
                "shape": [len(maps), *maps[0].shape],
                "data": np.concatenate([m.ravel() for m in maps]).tolist(),
            }
        )
    return [output for output in outputs if wanted is None or output["name"] in wanted]
