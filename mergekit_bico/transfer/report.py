"""The transfer report: a JSON-able dict (plus a PNG plot when matplotlib is installed).

Contents: the models and settings, the layer map (and the similarity matrix for
``layer_map: similarity``), per target block and space the Procrustes fit (widths, rank, relative
residuals ``||X_A R - X_B||_F / ||X_B||_F`` for the statistics used), the tensors left at the
target's value with the reason, the rule applied to each kind of tensor, timings (statistics pass
vs SVD / maps vs delta mapping) and peak memory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

__all__ = ["TransferReport"]


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN / inf -> None, tuples -> lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class TransferReport:
    """Mutable report filled by the preparation and by every ``delta()`` call."""

    def __init__(self, **meta: Any):
        self.meta: dict[str, Any] = dict(meta)
        self.layer_map: Optional[list[Optional[int]]] = None
        self.layer_map_rule: Optional[str] = None
        self.similarity: Optional[list[list[float]]] = None
        self.block_update_size: Optional[dict[str, list[float]]] = None
        self.spaces: list[dict[str, Any]] = []
        self.untransferred: dict[str, str] = {}
        self.zero_blocks: list[str] = []
        self.rules: dict[str, list[str]] = {}
        self.timings: dict[str, float] = {"statistics_s": 0.0, "maps_s": 0.0, "similarity_s": 0.0, "deltas_s": 0.0}
        self.memory: dict[str, Any] = {}
        self.notes: list[str] = []
        self.cache: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        self.plot: str = "not written yet"

    def rule(self, rule: str, tensor: str) -> None:
        names = self.rules.setdefault(rule, [])
        if tensor not in names:
            names.append(tensor)

    def skip(self, tensor: str, reason: str) -> None:
        self.untransferred[tensor] = reason

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def to_dict(self) -> dict[str, Any]:
        residuals = [s["residual"] for s in self.spaces if s.get("residual") is not None and math.isfinite(s["residual"])]
        return _clean({
            **self.meta,
            "layer_map_rule": self.layer_map_rule,
            "layer_map": self.layer_map,
            "similarity": self.similarity,
            "block_update_size": self.block_update_size,
            "spaces": self.spaces,
            "summary": {
                "spaces": len(self.spaces),
                "max_residual": max(residuals) if residuals else None,
                "mean_residual": sum(residuals) / len(residuals) if residuals else None,
                "tensors_by_rule": {k: len(v) for k, v in sorted(self.rules.items())},
                "untransferred": len(self.untransferred),
            },
            "rules": self.rules,
            "untransferred": [{"tensor": k, "reason": v} for k, v in self.untransferred.items()],
            "zero_delta_blocks": self.zero_blocks,
            "timings": self.timings,
            "memory": self.memory,
            "cache": self.cache,
            "notes": self.notes,
            "plot": self.plot,
            **self.extra,
        })

    def write(self, out_dir: Path, stem: str) -> list[Path]:
        """``<stem>.json`` and, when matplotlib is importable, ``<stem>.png`` (residual per block and space)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths: list[Path] = []
        png = out_dir / f"{stem}.png"
        if self._plot(png):
            self.plot = png.name
            paths.append(png)
        js = out_dir / f"{stem}.json"
        js.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        paths.insert(0, js)
        return paths

    def _plot(self, path: Path) -> bool:
        rows = [s for s in self.spaces if s.get("layer") is not None and s.get("residual") is not None]
        if not rows:
            self.plot = "skipped: no per-block residuals (no statistics)"
            return False
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except Exception:  # noqa: BLE001 - optional dependency, skip silently
            self.plot = "skipped: matplotlib is not installed"
            return False
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for space in sorted({s["space"] for s in rows}):
            pts = sorted((s["layer"], s["residual"]) for s in rows if s["space"] == space)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=space)
        ax.set_xlabel("target block")
        ax.set_ylabel("Procrustes residual ||X_A R - X_B|| / ||X_B||")
        ax.set_title(f"BiCo maps: {self.meta.get('source_base', '')} -> {self.meta.get('target_base', '')}"[:90])
        ax.legend(fontsize=7, ncol=3)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return True
