"""Task-vector transfer between base models: BiCo (Procrustes maps from paired calibration
statistics), and the ``naive`` / ``gradfix`` baselines behind the same interface.

    prepared = prepare_transfer(cfg=..., source_finetuned=..., target_base=..., calibration=..., cache_dir=...)
    prepared.delta("model.layers.0.self_attn.q_proj.weight")  # float32, target shape, or None
    prepared.report(); prepared.write_report(out_dir, "transfer_report_0")
"""

from mergekit_bico.transfer.api import NORM_RULES, PreparedTransfer, prepare_transfer

__all__ = ["prepare_transfer", "PreparedTransfer", "NORM_RULES"]
