"""Per-task export of a trained MoRE adapter, from the saved adapter folder, offline (never inside a ZeRO-3 engine):
merged HF checkpoints (merge.py: THE merge, streaming tensor by tensor into shards) or standard PEFT LoRA adapters
(peft_export.py). run.py is the stage behind launch/merge.py: write into a temp folder, check (check.py: logits
and every merged tensor), rename into place, report."""
from pipeline.export.merge import AdapterDeltas, BasePlan, MergeStats, nf4_roundtrip, stream_merge
from pipeline.export.peft_export import export_peft

__all__ = ["AdapterDeltas", "BasePlan", "MergeStats", "nf4_roundtrip", "stream_merge", "export_peft"]
