"""Per-task export of a trained MoRE adapter: merged HF checkpoints (merge.py in memory, stream.py streaming tensor
by tensor into shards) and standard PEFT LoRA adapters (peft_export.py), both from the saved adapter folder, offline
(never inside a ZeRO-3 engine). run.py is the stage behind launch/merge.py: write, check logits, rename, report."""
from pipeline.export.merge import AdapterDeltas, iter_merged_tensors, merge_all, merge_task, merge_task_into
from pipeline.export.peft_export import export_all_peft, export_peft
from pipeline.export.stream import BasePlan, MergeStats, nf4_roundtrip, stream_merge

__all__ = ["AdapterDeltas", "BasePlan", "MergeStats", "iter_merged_tensors", "merge_all", "merge_task",
           "merge_task_into", "nf4_roundtrip", "stream_merge", "export_all_peft", "export_peft"]
