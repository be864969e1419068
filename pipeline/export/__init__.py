"""Per-task export of a trained MoRE adapter: merged HF checkpoints (merge.py) and standard PEFT LoRA adapters
(peft_export.py), both from the saved adapter folder, offline (never inside a ZeRO-3 engine)."""
from pipeline.export.merge import AdapterDeltas, iter_merged_tensors, merge_all, merge_task, merge_task_into
from pipeline.export.peft_export import export_all_peft, export_peft

__all__ = ["AdapterDeltas", "iter_merged_tensors", "merge_all", "merge_task", "merge_task_into", "export_all_peft",
           "export_peft"]
